"""The built-in engine: one run end to end, from its config to its outcome.

:func:`execute` loads the data and its seeded split into clients, builds the model from
its weights (recipe weights come resolved to their checkpoint file: the federated core
never reaches up into pre-training), applies the tuning method, and runs the mode's
rounds (:data:`MODES`: FedAvg, local, central) through the one training loop.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedtune_core import recipes, tuning
from fedtune_core.config import RunConfig
from fedtune_core.fl import data, features, inputs, models, partition
from fedtune_core.fl.baselines import run_central, run_local
from fedtune_core.fl.fedavg import row, run_fl, state_bytes
from fedtune_core.fl.limits import Limits, Meter
from fedtune_core.fl.training import Client, Trainer, pick_device

MODES: dict[str, Callable[..., tuple[list[dict], dict]]] = {
    "fl": run_fl, "local": run_local, "central": run_central}


@dataclass
class Outcome:
    """What a run produced, before it becomes a record."""

    rows: list[dict]
    final: dict[str, Any]
    trainable: int
    total: int
    state_bytes: int
    weights: dict[str, Any]  # kind, source, quick_gelu (CLIP) and why
    device: str
    rehearsal: dict[str, Any] | None = None  # a rehearsal's measurements (limits.Meter)


def zero_shot(model: str, dataset: str, weights: str = "auto", device: str | None = None,
              data_root: str | None = None, *, weights_file: str | None = None) -> float:
    """Accuracy of an untrained classifier on the global test set (CLIP: zero-shot).

    For CLIP models the head is built from the text embeddings of the class prompts, so
    this is CLIP's zero-shot accuracy; for ViT it is the accuracy of a random head.
    ``weights_file``: recipe weights resolved to their checkpoint (see :func:`build_model`).
    """
    cfg = RunConfig(model=model, weights=weights, dataset=dataset, method="head")  # validates
    dev = pick_device(device)
    data_ = data.load(dataset, data_root)
    net = models.build(model, data_.class_names, weights_file or weights)
    return Trainer(net, [], cfg, dev).evaluate(data_.test.to(dev))[0]


def client_indices(cfg: RunConfig, parts: partition.ClientSplit
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each client's (train, own test) indices into the training pool.

    In a validation run (``val_fraction > 0``) each client's validation split (carved from
    its training split) takes the place of its test split.
    """
    if not cfg.val_fraction:
        return list(zip(parts.train, parts.test, strict=True))
    held = partition.hold_out(parts.train, cfg.val_fraction, cfg.seed)
    return list(zip(held.train, held.test, strict=True))


def _clients(cfg: RunConfig, dataset: data.Dataset, parts: partition.ClientSplit,
             dev: torch.device) -> tuple[list[Client], data.Split]:
    """The clients and the evaluation set of a run, on the device.

    Normally each client holds its train and local test split, and the evaluation set is
    the global test set. In a validation run their validation splits' union takes the place
    of the global test set, and no test image is even moved (:func:`client_indices`).
    """
    train, pairs = dataset.train.to(dev), client_indices(cfg, parts)
    clients = [Client(train.subset(a), train.subset(b)) for a, b in pairs]
    if not cfg.val_fraction:
        return clients, dataset.test.to(dev)
    return clients, train.subset(np.concatenate([b for _, b in pairs]))


def _encoded(trainer: Trainer, dataset: data.Dataset, cfg: RunConfig,
             dev: torch.device) -> data.Dataset:
    """The dataset as the frozen encoder's features, for :func:`_clients` (the test set
    only where the run uses it: a validation run does not)."""
    splits = [dataset.train.to(dev)] + ([] if cfg.val_fraction else [dataset.test.to(dev)])
    feats = features.encode(trainer, *splits)
    test = feats[1] if len(feats) > 1 else dataset.test
    return data.Dataset(dataset.name, feats[0], test, dataset.class_names)


def _as_validation(metrics: dict[str, Any]) -> dict[str, Any]:
    """A validation run's metrics: every ``test`` in a name becomes ``val``."""
    return {k.replace("test", "val"): v for k, v in metrics.items()}


def execute(cfg: RunConfig, device: str | None = None, data_root: str | None = None,
            progress: bool = False, cache_features: bool = True,
            weights_file: str | None = None) -> Outcome:
    """Run one configuration end to end and return its outcome.

    Everything random derives from ``cfg.seed``: model initialisation, the partition,
    client sampling and data order. ``zero_shot_test_acc`` is the accuracy of the model as
    built, before the tuning method adds anything (CLIP: its zero-shot accuracy); round 0
    is the model before any training, the method's modules added. When only the head
    trains and ``cache_features``, the frozen encoder runs once over the training pool and
    the test set and every round trains the head on those features
    (:mod:`fedtune_core.fl.features`); the metrics are those of the uncached path (tested to
    1e-5 in fp32 on CPU). ``weights_file``: the checkpoint that recipe weights resolve to
    (:func:`build_model`); the record still names the recipe.

    Raises:
        ConfigError: input that turns out bad once the data is loaded (a partition that
            leaves a client without data, unreadable images or weights), before training.
        Diverged: a loss or an accuracy became non-finite; the round says when.
        ValueError: ``cfg.engine`` is not ``builtin``.
    """
    if cfg.engine != "builtin":
        raise ValueError(f"fl.execute runs the built-in loop, not engine {cfg.engine!r} "
                         "(fedtune_core.fl.flower_app.execute runs Flower)")
    dev = pick_device(device)
    limits = Limits.from_env()  # set by a rehearsal (fedtune grid --rehearse)
    meter = Meter(dev) if limits else None  # from here: the run's peak memory
    dataset, parts = load_split(cfg, data_root)
    model = build_model(cfg, dataset, weights_file)
    built = Trainer(model, [], cfg, dev, limits=limits, meter=meter)
    once = limits is None and inputs.fits(cfg, dataset, model)  # preprocessing once
    if once:
        dataset = inputs.preprocessed(built, dataset, cfg, dev)
        built = inputs.InputsView(built)
    clients, evaluation = _clients(cfg, dataset, parts, dev)
    as_built = built.evaluate(evaluation)
    names = tuning.prepare(model, cfg.method, cfg.method_options)
    trainer = Trainer(model, names, cfg, dev, limits=limits, meter=meter)
    if once:
        trainer = inputs.InputsView(trainer)
    if cache_features and trainer.encoder_frozen:
        clients, evaluation = _clients(cfg, _encoded(trainer, dataset, cfg, dev), parts, dev)
        trainer = features.HeadView(trainer)
    initial = trainer.evaluate(evaluation)
    rows, final = MODES[cfg.mode](cfg, trainer, clients, evaluation, progress)
    return outcome(cfg, trainer, rows, final, as_built, initial)


def load_split(cfg: RunConfig, data_root: str | None
               ) -> tuple[data.Dataset, partition.ClientSplit]:
    """The run's dataset and its seeded split into clients (checked to fit the data).

    Raises:
        ConfigError: a partition that leaves a client without data, unreadable images.
    """
    dataset = data.load(cfg.dataset, data_root)
    parts = partition.split_clients(dataset.train.labels.numpy(), cfg.partition, cfg.clients,
                                    cfg.seed, cfg.local_test_fraction,
                                    num_classes=len(dataset.class_names))  # fits? before building
    return dataset, parts


# models built in this process, for the next run of the same build, where a pool worker
# asked for it (keep_built_models): key -> (the model as built, torch's RNG state after)
_BUILT: dict[tuple, tuple[models.Classifier, torch.Tensor]] | None = None
KEEP_BUILT = 32  # models kept at most, each under KEEP_BUILT_PARAMS parameters
KEEP_BUILT_PARAMS = 5_000_000  # the tiny models (~0.1M); a ViT-B/16 is built every time


def keep_built_models(keep: bool = True) -> None:
    """From now on (``keep``) this process keeps the small models it builds for later runs
    of the same build (:func:`build_model`); pool workers do, one-off runs need not."""
    global _BUILT
    _BUILT = {} if keep else None


def build_model(cfg: RunConfig, dataset: data.Dataset,
                weights_file: str | None = None) -> models.Classifier:
    """The run's model as built from its weights, initialised from the run's seed (the
    same in every process that builds it), before the tuning method is applied.

    Recipe weights (fedtune's own pre-training) are resolved to their checkpoint before the
    federated core builds a model: ``weights_file`` is that file
    (:func:`fedtune_core.proxy.pretrain.weights_file`, which the runs room calls); without it
    a recipe is refused in one line (:func:`fedtune_core.fl.models.build`).

    After :func:`keep_built_models`, a small model built from a resolved checkpoint (keyed
    by its path, size and modification time) or from random init is kept for the next run
    with the same model, weights, classes, activation and seed: that run gets a copy and
    torch's RNG as building would have left it, so what comes after (the method's modules,
    the head's init) draws the same numbers (tests/test_fl.py).
    """
    torch.manual_seed(cfg.seed)
    source = weights_file or cfg.weights
    kind = models.resolve_weights(cfg.model, cfg.weights)[0]
    if _BUILT is None or not (weights_file or kind == "none"):
        return models.build(cfg.model, dataset.class_names, source, quick_gelu=cfg.quick_gelu)
    stat = os.stat(weights_file) if weights_file else None
    key = (cfg.model, source, stat and (stat.st_size, stat.st_mtime_ns),
           tuple(dataset.class_names), cfg.quick_gelu, cfg.seed)
    if key in _BUILT:
        model, rng = _BUILT[key]
        torch.set_rng_state(rng)
        return copy.deepcopy(model)
    model = models.build(cfg.model, dataset.class_names, source, quick_gelu=cfg.quick_gelu)
    if sum(p.numel() for p in model.parameters()) <= KEEP_BUILT_PARAMS:
        if len(_BUILT) >= KEEP_BUILT:
            _BUILT.pop(next(iter(_BUILT)))
        _BUILT[key] = (copy.deepcopy(model), torch.get_rng_state())
    return model


def outcome(cfg: RunConfig, trainer: Trainer, rows: list[dict], final: dict[str, Any],
            as_built: tuple[float, float], initial: tuple[float, float]) -> Outcome:
    """A run's outcome from its rounds and final metrics (rows: rounds 1..R, round 0 added
    here from ``initial``); every engine ends a run through it."""
    rows.insert(0, row(0, initial, None, 0, 0, 0.0))
    final |= {"zero_shot_test_acc": as_built[0], "initial_test_acc": initial[0],
              "bytes_up": sum(r["bytes_up"] for r in rows),
              "bytes_down": sum(r["bytes_down"] for r in rows)}
    if cfg.val_fraction:
        rows, final = [_as_validation(r) for r in rows], _as_validation(final)
    trainable, total = tuning.count_parameters(trainer.model)
    measured = trainer.meter.summary(cfg.batch_size) if trainer.meter else None
    return Outcome(rows, final, trainable, total, state_bytes(trainer.state()),
                   _weights_info(cfg), str(trainer.device), measured)


def _weights_info(cfg: RunConfig) -> dict[str, Any]:
    kind, source = models.resolve_weights(cfg.model, cfg.weights)
    quick, why = models.resolve_quick_gelu(cfg.model, cfg.weights, cfg.quick_gelu)
    return ({"kind": kind, "source": source, "quick_gelu": quick, "quick_gelu_from": why}
            | recipes.describe(cfg.model, cfg.weights))

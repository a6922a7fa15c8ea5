"""FedAvg, the local-only and centralised baselines, and the one training loop they share.

The backbone is built once per run and shared by every client. What travels is the
trainable state only, ``{name: tensor}``; a client loads it into the shared model, trains,
and hands back its new state and sample count; the server averages (:func:`fedavg`).
Bytes are measured from the tensors that travel.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fedtune_core import data, models, partition, pretrain, recipes, tuning
from fedtune_core.config import RunConfig
from fedtune_core.errors import ConfigError, Diverged
from fedtune_core.limits import Limits, Meter

State = dict[str, torch.Tensor]


def fedavg(updates: Iterable[tuple[State, int]]) -> State:
    """Average client states weighted by their sample counts.

    Consumes ``updates`` one at a time, so a generator of client updates needs memory for
    one running sum and one client state, not one state per client.

    Raises:
        ValueError: no updates, a non-positive count, or states with different names or
            shapes.
    """
    total, acc = 0, None
    for state, n in updates:
        if n <= 0:
            raise ValueError(f"a client update must have a positive sample count, got {n}")
        if acc is None:
            acc = {k: v.detach().float() * n for k, v in state.items()}
            dtypes = {k: v.dtype for k, v in state.items()}
        elif state.keys() != acc.keys():
            raise ValueError("client states hold different parameter names")
        else:
            for k, v in state.items():
                if v.shape != acc[k].shape:
                    raise ValueError(f"client states disagree on the shape of {k!r}: "
                                     f"{tuple(v.shape)} vs {tuple(acc[k].shape)}")
                acc[k] += v.detach().float() * n
        total += n
    if acc is None:
        raise ValueError("fedavg needs at least one client update")
    return {k: (v / total).to(dtypes[k]) for k, v in acc.items()}


def state_bytes(state: State) -> int:
    """Bytes a state takes on the wire: sum of numel x element size."""
    return sum(t.numel() * t.element_size() for t in state.values())


def pick_device(device: str | None = None) -> torch.device:
    """``auto``/None: CUDA if available, else CPU; else the named device, checked.

    Raises:
        ConfigError: an unknown device name, or a CUDA device this machine does not have.
    """
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpus = torch.cuda.device_count()
    valid = ["auto", "cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(gpus)] if gpus else [])
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (
            dev.type == "cuda" and (dev.index or 0) >= gpus):
        raise ConfigError(f"unknown or unavailable device {device!r}; valid choices here: "
                          f"{', '.join(valid)}")
    return dev


def set_cpu_threads() -> int:
    """One intra-op thread per run process unless $FEDTUNE_THREADS says otherwise.

    On the 2-core machines we measured, two threads made a tiny model's training step 40-80x
    slower and a ViT-B/16 forward 1.4x slower than one (``benchmarks/threads.py``); CPU
    parallelism comes from running several runs at once (``fedtune grid --jobs``).
    """
    from fedtune_core.checks import threads as configured

    threads = configured()
    torch.set_num_threads(threads)
    return threads


@dataclass
class Client:
    """One client's own data: its local train and test splits (on the device)."""

    train: data.Split
    test: data.Split


class Trainer:
    """The shared model, what trains in it, and the loop every mode uses.

    When only the head trains (:attr:`encoder_frozen`), :meth:`to_features` runs the frozen
    encoder once over the splits a run needs and switches the trainer to a feature view:
    from then on :meth:`fit` and :meth:`evaluate` take splits of features and run the head
    only. Data order, batches and optimizer are the same as on images.

    ``amp``: forward passes under bf16 autocast (default: on CUDA only; True runs the same
    autocast path on the CPU, as the tests do). ``limits``: a rehearsal's caps
    (:class:`~fedtune_core.limits.Limits`), with ``meter`` timing every training step and
    forward pass.
    """

    def __init__(self, model: models.Classifier, names: list[str], cfg: RunConfig,
                 device: torch.device, amp: bool | None = None, limits: Limits | None = None,
                 meter: Meter | None = None):
        self.model = model.to(device)
        self.params = {n: p for n, p in model.named_parameters() if n in set(names)}
        self.pre = data.Preprocess(model.input_size, model.mean, model.std,
                                   model.interpolation).to(device)
        self.cfg = cfg
        self.device = device
        self.amp = device.type == "cuda" if amp is None else amp
        self.limits = limits
        self.meter = meter
        self.on_features = False  # True after to_features(): splits hold encoder features
        self.on_inputs = False  # True after to_inputs(): splits hold preprocessed images

    @property
    def encoder_frozen(self) -> bool:
        """Only the head trains, so the encoder's output for an image never changes."""
        return all(n.startswith("head.") for n in self.params)

    @torch.no_grad()
    def to_features(self, *splits: data.Split, batch: int = 512) -> list[data.Split]:
        """Encode ``splits`` once (encoder in eval mode) and switch to the feature view.

        Returns the splits with ``images`` replaced by the features the head takes
        (float32, N x width; CLIP's already L2-normalised). Not inference mode: the head
        trains on these tensors.

        Raises:
            ValueError: something besides the head trains, so features would go stale.
        """
        if not self.encoder_frozen:
            raise ValueError("cached features need a frozen encoder; trainable: "
                             f"{[n for n in self.params if not n.startswith('head.')][:3]}")
        self.model.eval()
        out = []
        t0 = self.meter.clock() if self.meter else 0.0
        for split in splits:
            chunks = [split.images[s:s + batch] for s in range(0, len(split), batch)]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                feats = [self.model.features(self._inputs(c)).float() for c in chunks]
            out.append(data.Split(torch.cat(feats), split.labels))
        if self.meter:
            self._forward_timed(t0, sum(len(s) for s in splits))
        self.on_features = True
        return out

    @torch.no_grad()
    def to_inputs(self, *splits: data.Split, batch: int = 512) -> list[data.Split]:
        """Preprocess ``splits`` once (resize, clamp, normalise: :class:`data.Preprocess`)
        and switch to the input view, in which batches skip preprocessing.

        Each image is preprocessed on its own, so the inputs are those a batch would get
        (bitwise: ``tests/test_preprocess_once.py``); it saves recomputing them in every
        batch of every round. Returns the splits with ``images`` as float32 model inputs.
        """
        out = []
        for split in splits:
            chunks = [split.images[s:s + batch] for s in range(0, len(split), batch)]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                inputs = [self.pre(c) for c in chunks] or [self.pre(split.images)]
            out.append(data.Split(torch.cat(inputs), split.labels))
        self.on_inputs = True
        return out

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        return images if self.on_inputs else self.pre(images)

    def state(self) -> State:
        """A copy of the trainable tensors: what a client sends."""
        return {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def load(self, state: State) -> None:
        """Write a received state into the shared model."""
        for n, p in self.params.items():
            p.copy_(state[n])

    def _optimizer(self) -> torch.optim.Optimizer:
        params, cfg = list(self.params.values()), self.cfg
        if cfg.optimizer == "adamw":
            # foreach: the for-loop step's numbers, bitwise, in fewer ops (tests/test_fl.py)
            return torch.optim.AdamW(params, lr=cfg.resolved_lr, weight_decay=cfg.weight_decay,
                                     foreach=True)
        return torch.optim.SGD(params, lr=cfg.resolved_lr, momentum=0.9,
                               weight_decay=cfg.weight_decay)

    def _logits(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            if self.on_features:
                return self.model.head(inputs).float()
            return self.model(self._inputs(inputs)).float()

    def fit(self, split: data.Split, epochs: int, seed: Iterable[int]) -> float:
        """Train on ``split`` for ``epochs`` with a fresh optimizer; return the mean loss.

        ``seed`` (e.g. run seed, round, client) fixes the data order.
        """
        rng = np.random.default_rng(list(seed))
        return self.train_on(split, [rng.permutation(len(split)) for _ in range(epochs)])

    def train_on(self, split: data.Split, passes: list[np.ndarray]) -> float:
        """Train on ``split`` in the given sample order with a fresh optimizer; mean loss.

        Each array of ``passes`` (indices into ``split``) is cut into mini-batches on its own.
        """
        opt, bs = self._optimizer(), self.cfg.batch_size
        self.model.train()
        losses = []
        cap = self.limits.train_steps if self.limits else None
        for indices in passes:
            order = torch.as_tensor(indices, device=self.device)
            for start in range(0, len(order), bs):
                if cap is not None and len(losses) >= cap:
                    break
                t0 = self.meter.clock() if self.meter else 0.0
                idx = order[start:start + bs]
                loss = F.cross_entropy(self._logits(split.images[idx]), split.labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.detach())
                if self.meter:
                    self.meter.steps.append(self.meter.clock() - t0)
        return torch.stack(losses).mean().item()

    def _forward_timed(self, t0: float, images: int) -> None:
        self.meter.forward_seconds += self.meter.clock() - t0
        self.meter.forward_images += images

    @torch.inference_mode()
    def evaluate(self, split: data.Split, batch: int = 512) -> tuple[float, float]:
        """(accuracy, mean cross-entropy) on ``split`` (a rehearsal: on its first samples)."""
        self.model.eval()
        if self.limits:
            split = data.Split(split.images[:self.limits.eval_samples],
                               split.labels[:self.limits.eval_samples])
        t0 = self.meter.clock() if self.meter else 0.0
        correct, loss = 0, 0.0
        for start in range(0, len(split), batch):
            logits = self._logits(split.images[start:start + batch])
            labels = split.labels[start:start + batch]
            correct += (logits.argmax(1) == labels).sum().item()
            loss += F.cross_entropy(logits, labels, reduction="sum").item()
        if self.meter:
            self._forward_timed(t0, len(split))
        return correct / len(split), loss / len(split)

    def per_client(self, clients: list[Client], which: str) -> np.ndarray:
        """Accuracy of the current model on each client's own ``train`` or ``test`` split."""
        return np.array([self.evaluate(getattr(c, which))[0] for c in clients])


def _eval_round(cfg: RunConfig, r: int) -> bool:
    return r % cfg.eval_every == 0 or r == cfg.rounds


def schedule(cfg: RunConfig) -> list[np.ndarray]:
    """The clients FedAvg's seeded sampler picks in each round (sorted ids, one array a round).

    Every mode follows it, so the local and centralised baselines of a config do the same
    work as its FedAvg run: a local client trains in exactly the rounds FedAvg picks it.
    """
    sampler = np.random.default_rng([cfg.seed, 1])
    return [np.sort(sampler.choice(cfg.clients, cfg.sample, replace=False))
            for _ in range(cfg.rounds)]


def row(r: int, test: tuple[float, float] | None, train_loss: float, up: int, down: int,
         seconds: float, **extra: Any) -> dict[str, Any]:
    """One round's metrics. Raises :class:`Diverged` if a loss or accuracy is not finite."""
    acc, loss = test if test else (None, None)
    for what, value in (("train_loss", train_loss), ("test_loss", loss), ("test_acc", acc)):
        if value is not None and not math.isfinite(value):
            raise Diverged(r, what, value)
    return {"round": r, "test_acc": acc, "test_loss": loss, "train_loss": train_loss,
            "bytes_up": up, "bytes_down": down, "seconds": seconds, **extra}


def client_step(cfg: RunConfig, trainer: Trainer, state: State, client: Client, r: int,
                c: int) -> tuple[State, int, float]:
    """One client's part of round ``r``: load the server's ``state``, train E local epochs
    on its own split (data order from seed, round and client id ``c``), hand back
    (new state, sample count, mean training loss). The same step runs in every engine."""
    trainer.load(state)
    loss = trainer.fit(client.train, cfg.local_epochs, (cfg.seed, r, int(c)))
    return trainer.state(), len(client.train), loss


def server_step(cfg: RunConfig, trainer: Trainer, evaluation: data.Split, r: int,
                updates: Iterable[tuple[State, int]]) -> tuple[State, tuple[float, float] | None]:
    """The server's part of round ``r``: average ``updates`` (:func:`fedavg`), load the
    result, and evaluate it where the round asks for it; (new state, (acc, loss) or None)."""
    state = fedavg(updates)
    trainer.load(state)
    return state, trainer.evaluate(evaluation) if _eval_round(cfg, r) else None


def _client_updates(cfg: RunConfig, trainer: Trainer, state: State, chosen: list[Client],
                    ids: np.ndarray, r: int, log: dict[str, list]) -> Iterator[tuple[State, int]]:
    """Each chosen client in turn: receive ``state``, train, send its state and sample count."""
    for client, c in zip(chosen, ids, strict=True):
        update, n, loss = client_step(cfg, trainer, state, client, r, int(c))
        log["loss"].append(loss)
        log["bytes"].append(state_bytes(update))
        log["samples"][c] += cfg.local_epochs * n
        yield update, n


def samples_metrics(per_client: np.ndarray) -> dict[str, Any]:
    return {"samples_processed": int(per_client.sum()),
            "samples_per_client": [int(n) for n in per_client]}


def run_fl(cfg: RunConfig, trainer: Trainer, clients: list[Client], test: data.Split,
           progress: bool) -> tuple[list[dict], dict]:
    """FedAvg: K of N clients per round, E local epochs each, sample-weighted averaging."""
    state = trainer.state()
    samples = np.zeros(len(clients), dtype=np.int64)
    rows = []
    for r, chosen in enumerate(tqdm(schedule(cfg), desc="rounds", leave=False,
                                    disable=not progress), start=1):
        t0 = time.perf_counter()
        log: dict[str, Any] = {"loss": [], "bytes": [], "samples": samples}
        down = cfg.sample * state_bytes(state)
        state, evaluated = server_step(cfg, trainer, test, r, _client_updates(
            cfg, trainer, state, [clients[c] for c in chosen], chosen, r, log))
        rows.append(row(r, evaluated, float(np.mean(log["loss"])), sum(log["bytes"]), down,
                         time.perf_counter() - t0))
    return rows, final_shared(trainer, clients, rows) | samples_metrics(samples)


def run_central(cfg: RunConfig, trainer: Trainer, clients: list[Client], test: data.Split,
                progress: bool) -> tuple[list[dict], dict]:
    """All clients' training data pooled, compute-matched to FedAvg.

    In each round the pooled model processes as many samples as FedAvg's sampled clients
    do in that round (E x their training samples), drawn from a stream of shuffled passes
    over the pooled data (a fresh permutation whenever one runs out).
    """
    pooled = data.Split(torch.cat([c.train.images for c in clients]),
                        torch.cat([c.train.labels for c in clients]))
    owner = np.repeat(np.arange(len(clients)), [len(c.train) for c in clients])
    stream = _shuffled_stream(len(pooled), np.random.default_rng([cfg.seed, 3]))
    samples = np.zeros(len(clients), dtype=np.int64)
    rows = []
    for r, chosen in enumerate(tqdm(schedule(cfg), desc="rounds", leave=False,
                                    disable=not progress), start=1):
        t0 = time.perf_counter()
        count = cfg.local_epochs * sum(len(clients[c].train) for c in chosen)
        order = np.fromiter(stream, dtype=np.int64, count=count)
        loss = trainer.train_on(pooled, [order])
        samples += np.bincount(owner[order], minlength=len(clients))
        evaluated = trainer.evaluate(test) if _eval_round(cfg, r) else None
        rows.append(row(r, evaluated, loss, 0, 0, time.perf_counter() - t0))
    return rows, final_shared(trainer, clients, rows) | samples_metrics(samples)


def _shuffled_stream(n: int, rng: np.random.Generator) -> Iterator[int]:
    """Indices 0..n-1 in a fresh random order, pass after pass, for ever."""
    while True:
        yield from rng.permutation(n).tolist()


def run_local(cfg: RunConfig, trainer: Trainer, clients: list[Client], test: data.Split,
              progress: bool) -> tuple[list[dict], dict]:
    """Each client trains alone, compute-matched to FedAvg: in exactly the rounds FedAvg's
    sampler picks it, E local epochs with a fresh optimizer and the same data order.

    Rows hold the mean (and spread) over clients of each client's own model; a client's
    model is evaluated again only when it has trained since its last evaluation.
    """
    init, picked = trainer.state(), schedule(cfg)
    n, rounds = len(clients), cfg.rounds
    acc, loss = np.full((n, rounds), np.nan), np.full((n, rounds), np.nan)
    train_loss, seconds = np.full((n, rounds), np.nan), np.zeros((n, rounds))
    own_test, own_train = np.zeros(n), np.zeros(n)
    samples = np.zeros(n, dtype=np.int64)
    untrained = trainer.evaluate(test)
    for c in tqdm(range(n), desc="clients", leave=False, disable=not progress):
        trainer.load(init)
        current = untrained  # (accuracy, loss) of client c's model as it is now
        for r in range(1, rounds + 1):
            t0 = time.perf_counter()
            if c in picked[r - 1]:
                train_loss[c, r - 1] = trainer.fit(clients[c].train, cfg.local_epochs,
                                                   (cfg.seed, r, c))
                samples[c] += cfg.local_epochs * len(clients[c].train)
                current = None
            if _eval_round(cfg, r):
                current = current or trainer.evaluate(test)
                acc[c, r - 1], loss[c, r - 1] = current
            seconds[c, r - 1] = time.perf_counter() - t0
        own_test[c] = trainer.evaluate(clients[c].test)[0]
        own_train[c] = trainer.evaluate(clients[c].train)[0]
    rows = []
    for r in range(1, rounds + 1):
        col = r - 1
        evaluated = (acc[:, col].mean(), loss[:, col].mean()) if _eval_round(cfg, r) else None
        rows.append(row(r, evaluated, float(np.nanmean(train_loss[:, col])), 0, 0,
                         float(seconds[:, col].sum()),
                         test_acc_std=float(acc[:, col].std()) if evaluated else None))
    last = rows[-1]
    final = {"test_acc": last["test_acc"], "test_loss": last["test_loss"],
             "test_acc_std": last["test_acc_std"],
             "local_test_acc": float(own_test.mean()), "local_test_acc_std": float(own_test.std()),
             "train_acc": float(own_train.mean())}
    return rows, final | samples_metrics(samples)


def final_shared(trainer: Trainer, clients: list[Client], rows: list[dict]) -> dict:
    """Final metrics of one shared model (FedAvg, central): global and per-client."""
    own_test = trainer.per_client(clients, "test")
    return {"test_acc": rows[-1]["test_acc"], "test_loss": rows[-1]["test_loss"],
            "test_acc_std": 0.0,
            "local_test_acc": float(own_test.mean()), "local_test_acc_std": float(own_test.std()),
            "train_acc": float(trainer.per_client(clients, "train").mean())}


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
              data_root: str | None = None) -> float:
    """Accuracy of an untrained classifier on the global test set (CLIP: zero-shot).

    For CLIP models the head is built from the text embeddings of the class prompts, so
    this is CLIP's zero-shot accuracy; for ViT it is the accuracy of a random head.
    """
    cfg = RunConfig(model=model, weights=weights, dataset=dataset, method="head")  # validates
    dev = pick_device(device)
    data_ = data.load(dataset, data_root)
    net = pretrain.build(model, data_.class_names, weights, progress=True)
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
    feats = trainer.to_features(*splits)
    test = feats[1] if len(feats) > 1 else dataset.test
    return data.Dataset(dataset.name, feats[0], test, dataset.class_names)


INPUTS_BUDGET = 256 * 2**20  # bytes: the most a run's preprocessed images may take


def _inputs_fit(cfg: RunConfig, dataset: data.Dataset, model: models.Classifier) -> bool:
    """Whether the run's images, preprocessed (float32 at the model's input size), fit
    :data:`INPUTS_BUDGET` (the demo's digits: 22 MB; CIFAR at 224: 36 GB, so per batch)."""
    count = len(dataset.train) + (0 if cfg.val_fraction else len(dataset.test))
    return count * 3 * model.input_size ** 2 * 4 <= INPUTS_BUDGET


def _preprocessed(trainer: Trainer, dataset: data.Dataset, cfg: RunConfig,
                  dev: torch.device) -> data.Dataset:
    """The dataset as model inputs, preprocessed once (:meth:`Trainer.to_inputs`); the
    test set only where the run uses it (a validation run never touches it)."""
    splits = [dataset.train.to(dev)] + ([] if cfg.val_fraction else [dataset.test.to(dev)])
    inputs = trainer.to_inputs(*splits)
    test = inputs[1] if len(inputs) > 1 else dataset.test
    return data.Dataset(dataset.name, inputs[0], test, dataset.class_names)


def _as_validation(metrics: dict[str, Any]) -> dict[str, Any]:
    """A validation run's metrics: every ``test`` in a name becomes ``val``."""
    return {k.replace("test", "val"): v for k, v in metrics.items()}


def execute(cfg: RunConfig, device: str | None = None, data_root: str | None = None,
            progress: bool = False, cache_features: bool = True) -> Outcome:
    """Run one configuration end to end and return its outcome.

    Everything random derives from ``cfg.seed``: model initialisation, the partition,
    client sampling and data order. ``zero_shot_test_acc`` is the accuracy of the model as
    built, before the tuning method adds anything (CLIP: its zero-shot accuracy); round 0
    is the model before any training, the method's modules added. When only the head
    trains and ``cache_features``, the frozen encoder runs once over the training pool and
    the test set and every round trains the head on those features
    (:meth:`Trainer.to_features`); the metrics are those of the uncached path (tested to
    1e-5 in fp32 on CPU).

    Raises:
        ConfigError: input that turns out bad once the data is loaded (a partition that
            leaves a client without data, unreadable images or weights), before training.
        Diverged: a loss or an accuracy became non-finite; the round says when.
        ValueError: ``cfg.engine`` is not ``builtin``.
    """
    if cfg.engine != "builtin":
        raise ValueError(f"fl.execute runs the built-in loop, not engine {cfg.engine!r} "
                         "(fedtune_core.flower_app.execute runs Flower)")
    dev = pick_device(device)
    limits = Limits.from_env()  # set by a rehearsal (fedtune grid --rehearse)
    meter = Meter(dev) if limits else None  # from here: the run's peak memory
    dataset, parts = load_split(cfg, data_root)
    model = build_model(cfg, dataset, progress)
    built = Trainer(model, [], cfg, dev, limits=limits, meter=meter)
    once = limits is None and _inputs_fit(cfg, dataset, model)
    if once:
        dataset = _preprocessed(built, dataset, cfg, dev)
    clients, evaluation = _clients(cfg, dataset, parts, dev)
    as_built = built.evaluate(evaluation)
    names = tuning.prepare(model, cfg.method, cfg.method_options)
    trainer = Trainer(model, names, cfg, dev, limits=limits, meter=meter)
    trainer.on_inputs = once
    if cache_features and trainer.encoder_frozen:
        clients, evaluation = _clients(cfg, _encoded(trainer, dataset, cfg, dev), parts, dev)
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
    """From now on (``keep``) this process keeps small models it builds for later runs of
    the same build (:func:`build_model`); pool workers do, one-off runs need not."""
    global _BUILT
    _BUILT = {} if keep else None


def build_model(cfg: RunConfig, dataset: data.Dataset, progress: bool) -> models.Classifier:
    """The run's model as built from its weights, initialised from the run's seed (the
    same in every process that builds it), before the tuning method is applied.

    After :func:`keep_built_models`, a small model built from a recipe's checkpoint (by its
    sha256, checked on every use) or from random init is kept for the next run with the
    same model, weights, classes, activation and seed: that run gets a copy and torch's RNG
    as building would have left it, so what comes after (the method's modules, the head's
    init) draws the same numbers (tests/test_fl.py).
    """
    torch.manual_seed(cfg.seed)
    kind, name = models.resolve_weights(cfg.model, cfg.weights)
    if _BUILT is None or kind not in ("recipe", "none"):
        return pretrain.build(cfg.model, dataset.class_names, cfg.weights,
                              quick_gelu=cfg.quick_gelu, progress=progress)
    if kind == "recipe":
        recipes.check_run_weights(cfg.model, cfg.weights)
    source = (pretrain.ensure(cfg.model, name, progress=progress)["sha256"]
              if kind == "recipe" else "none")
    key = (cfg.model, source, tuple(dataset.class_names), cfg.quick_gelu, cfg.seed)
    if key in _BUILT:
        model, rng = _BUILT[key]
        torch.set_rng_state(rng)
        return copy.deepcopy(model)
    model = pretrain.build(cfg.model, dataset.class_names, cfg.weights,
                           quick_gelu=cfg.quick_gelu, progress=progress)
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

"""Typed, frozen run configuration; validation; a run's identity (a stable hash).

A :class:`RunConfig` is data: every knob of one run. Validation happens on construction,
so a notebook, the CLI and the grid all fail the same way on bad input (a
:class:`~fedtune_core.errors.ConfigError` naming the bad value and the valid choices).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedtune_core.errors import (
    SEED_MAX,
    ConfigError,
    check_choice,
    check_int,
    check_range,
    check_str,
    choices,
)

MODES = ("fl", "local", "central")
ENGINES = ("builtin", "flower")  # fedtune's own FedAvg loop; Flower (fedtune_core.fl.flower_app)
# fields left out of to_dict (and so of the hash) at these values: the identity of every
# config from before they existed stays what it was
OMITTED_AT_DEFAULT = {"engine": "builtin"}
OPTIMIZERS = ("sgd", "adamw")
# integer fields: (lowest, highest). The upper bounds are far beyond any study (the paper:
# 50 clients, 50 rounds) and keep a typo from allocating terabytes or running for ever.
INT_BOUNDS = {"clients": (1, 10_000), "sample": (1, 10_000), "rounds": (1, 10_000),
              "local_epochs": (1, 1_000), "batch_size": (1, 65_536), "eval_every": (1, 10_000),
              "seed": (0, SEED_MAX)}


class FrozenDict(dict):
    """A read-only dict (picklable, unlike MappingProxyType): a config's method options."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a RunConfig is frozen; use cfg.replace(method_options=...)")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _refuse

    def __reduce__(self):
        return FrozenDict, (dict(self),)

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one run. Its hash is the run's identity in the cache.

    Where and how fast it runs (device, data directory, progress bars) is not part of
    the config: the same config gives the same experiment on any machine.

    ``val_fraction > 0`` makes a validation run (a learning-rate sweep's): that share of
    each client's training split is held out as its validation split, every evaluation
    is on the validation splits (their union stands in for the global test set), the
    test sets are never evaluated, and every metric is named ``val_*`` instead of
    ``test_*``.

    ``engine`` is part of the identity only when it is not ``builtin``: a Flower run is a
    record of its own (never a cache hit for the built-in loop's, nor the reverse), and the
    hash of every built-in config is what it was before engines existed.
    """

    model: str = "vit-tiny"  # backbone name, see specs.BACKBONES
    weights: str = "auto"  # auto (hub tag; tiny: glyphs-strong), none, hub tag, recipe or file
    quick_gelu: bool | None = None  # CLIP's activation; None: from the weights (see models.py)
    method: str = "bias"  # tuning method, see tuning.METHODS
    method_options: Mapping[str, Any] = field(default_factory=dict)  # the method's own knobs
    dataset: str = "digits"  # digits, fashion-mnist, cifar10, cifar100, imagefolder:PATH, synthetic
    partition: str = "dirichlet:0.5"  # iid, dirichlet:ALPHA, shards:K, fewshot:K
    clients: int = 10  # N clients in the federation
    sample: int = 5  # K clients sampled per round
    rounds: int = 10  # communication rounds (local/central: the same schedule, no exchange)
    local_epochs: int = 1  # E local epochs per round
    batch_size: int = 32  # local mini-batch size
    optimizer: str = "sgd"  # sgd (momentum 0.9) or adamw; fresh each round, as in FedAvg
    lr: float | None = None  # learning rate; None takes the method's default for the optimizer
    weight_decay: float = 0.0  # decoupled for adamw, L2 for sgd
    local_test_fraction: float = 0.2  # share of each client's data kept as its own test split
    val_fraction: float = 0.0  # > 0: a learning-rate sweep run, see below
    mode: str = "fl"  # fl (FedAvg), local (each client alone), central (all data pooled)
    eval_every: int = 1  # evaluate on the global test set every this many rounds (and the last)
    seed: int = 0  # the one seed for partition, init, client sampling and data order
    engine: str = "builtin"  # what runs FedAvg: builtin (our loop) or flower (Flower's engine)

    def __post_init__(self) -> None:
        if not isinstance(self.method_options, Mapping):
            raise ConfigError(f"method_options must be a table of the method's options, got "
                              f"{self.method_options!r}")
        object.__setattr__(self, "method_options", FrozenDict(self.method_options))
        self.validate()

    def validate(self) -> None:
        """Check every field; raise ConfigError on the first bad one.

        Cheap: no torch, no data loading (only a hub tag as weights imports its library to
        list the known tags), so the CLI rejects bad input in milliseconds. What needs the
        data (does the partition fit?) is checked when the run loads it, before training.
        """
        from fedtune_core import checks, recipes, specs, tuning

        for name in ("model", "weights", "method", "dataset", "partition", "optimizer", "mode",
                     "engine"):
            check_str(name, getattr(self, name))
        check_choice("model", self.model, specs.BACKBONES)
        recipes.check_run_weights(self.model, self.weights)  # specs.check_weights, and hashes
        specs.check_quick_gelu(self.model, self.weights, self.quick_gelu)
        check_choice("tuning method", self.method, tuning.METHODS)
        tuning.method_config(self.method, self.method_options)
        checks.check_dataset(self.dataset)
        specs.parse_partition(self.partition)
        check_choice("mode", self.mode, MODES)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("engine", self.engine, ENGINES)
        if self.engine != "builtin" and self.mode != "fl":
            raise ConfigError(f"engine {self.engine!r} runs FedAvg (mode 'fl') only, got mode "
                              f"{self.mode!r}; valid engines for it: builtin")
        for name, (low, high) in INT_BOUNDS.items():
            check_int(name, getattr(self, name), low, high)
        if self.sample > self.clients:
            raise ConfigError(f"sample must be at most clients ({self.clients}), got {self.sample}")
        if self.lr is not None:
            check_range("lr", self.lr, 0, low_open=True)
        check_range("weight_decay", self.weight_decay, 0)
        check_range("local_test_fraction", self.local_test_fraction, 0, 0.9, low_open=True)
        check_range("val_fraction", self.val_fraction, 0, 0.9)

    @property
    def resolved_lr(self) -> float:
        """The learning rate this run uses (explicit, or the method's default)."""
        from fedtune_core import tuning  # light: no torch (see tuning.registry)

        return self.lr if self.lr is not None else tuning.default_lr(self.method, self.optimizer)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready dict of the config, method options resolved to full values.

        Pre-training recipe weights (``auto`` on the tiny models) become ``<recipe>@<hash>``,
        so a changed recipe is a different run. A field at its :data:`OMITTED_AT_DEFAULT`
        value is left out.
        """
        from fedtune_core import recipes, tuning

        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["weights"] = recipes.weights_id(self.model, self.weights)
        out["method_options"] = dataclasses.asdict(
            tuning.method_config(self.method, self.method_options))
        out["lr"] = self.resolved_lr
        return {k: v for k, v in out.items()
                if k not in OMITTED_AT_DEFAULT or v != OMITTED_AT_DEFAULT[k]}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build a config from a dict (e.g. a record's), refusing unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {', '.join(unknown)}; "
                              f"valid fields: {choices(sorted(known))}")
        return cls(**values)

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def hash(self) -> str:
        """Stable identity: sha256 of the canonical JSON of :meth:`to_dict`, 16 hex digits.

        Defaults are resolved first, so ``lr=None`` and the explicit default lr are the
        same run, as are omitted and explicit default method options.
        """
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

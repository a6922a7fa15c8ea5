"""Learning rates chosen on validation data: the sweep runs, the choice, what it cost.

A profile may give a tuning method candidate rates instead of one rate
(``[lr] full = { select = [1e-5, 3e-5, 1e-4] }``). The runs that share every setting the
best rate could depend on form a *group*: every config field except the rate, the seed
and the federation and evaluation knobs in :data:`FREE` (so dataset, model, weights,
activation, method and its options, optimizer, batch size and weight decay, and any field
added later). Each group gets one *sweep run* per candidate: an ordinary run (cached,
hashed, recorded) in the profile's base federation setting, on one seed, with
``val_fraction > 0``: validation splits are carved from the clients' training splits, every
evaluation is on them, and no test set is ever evaluated (:mod:`fedtune_core.fl.fedavg`). The
candidate with the best final validation accuracy wins (ties: lower validation loss, then
the smaller rate), and every run of the group, in every experiment, uses it.

A winner at the edge of the candidates is a boundary, not an optimum: the group then gets
one more candidate one step beyond that edge (the ratio of the two outermost candidates
on that side), swept like the others, at most ``extend`` times (default 2) before the
choice is final (:func:`extend`). Deterministic: the new rate depends only on the sweep
records, and each extension is an ordinary cached run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fedtune_core.config import RunConfig
from fedtune_core.errors import ConfigError, check_range, is_number

# Fields that do not define a group: the rate itself, the seed, and the federation and
# evaluation knobs that differ between experiments (sweeps run in the base setting).
FREE = ("lr", "seed", "partition", "clients", "sample", "rounds", "local_epochs", "mode",
        "local_test_fraction", "eval_every", "val_fraction")
FEDERATION = ("partition", "clients", "sample", "rounds", "local_epochs", "local_test_fraction")
SETTINGS = ("val_fraction", "rounds", "seed", "extend")  # keys of a profile's [lr_selection]


@dataclass(frozen=True)
class Settings:
    """How candidate rates are compared: a profile's ``[lr_selection]`` table."""

    val_fraction: float = 0.2  # share of each client's training split held out to validate
    rounds: int | None = None  # sweep length; None: the profile's base rounds
    seed: int | None = None  # sweep seed; None: the profile's first seed
    extend: int = 2  # at most this many one-step extensions past an edge winner

    def __post_init__(self) -> None:
        if not isinstance(self.val_fraction, int | float) or isinstance(self.val_fraction, bool):
            raise ConfigError(f"lr_selection val_fraction must be a number, got "
                              f"{self.val_fraction!r}")
        check_range("lr_selection val_fraction", self.val_fraction, 0, 0.9, low_open=True)
        for name in ("rounds", "seed", "extend"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ConfigError(f"lr_selection {name} must be an integer, got {value!r}")
        if self.rounds is not None:
            check_range("lr_selection rounds", self.rounds, 1)
        if self.extend is None:
            raise ConfigError("lr_selection extend must be an integer, got None")
        check_range("lr_selection extend", self.extend, 0, 5)


def candidates(method: str, value: Any) -> tuple[float, ...] | None:
    """Parse a profile's ``[lr]`` entry: a rate (None returned) or ``{select = [...]}``.

    Raises:
        ConfigError: anything else, or candidates that are not distinct positive numbers.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        check_range(f"lr of {method}", value, 0, low_open=True)
        return None
    if not (isinstance(value, Mapping) and set(value) == {"select"}
            and isinstance(value["select"], list) and value["select"]):
        raise ConfigError(f"lr of {method} must be a number or {{ select = [rates...] }}, "
                          f"got {value!r}")
    rates = value["select"]
    for rate in rates:
        if not isinstance(rate, int | float) or isinstance(rate, bool) or not rate > 0:
            raise ConfigError(f"candidate rates of {method} must be numbers > 0, got {rate!r}")
    if len(set(rates)) != len(rates):
        raise ConfigError(f"candidate rates of {method} repeat a value: {rates}")
    return tuple(sorted(float(r) for r in rates))


def group_fields(cfg: RunConfig) -> dict[str, Any]:
    """The settings that define ``cfg``'s group (all config fields but :data:`FREE`)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in FREE}


def group_key(cfg: RunConfig) -> str:
    """A stable name of ``cfg``'s group: 16 hex digits of its fields' canonical JSON."""
    blob = json.dumps(group_fields(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Group:
    """Runs that share one chosen rate, and the sweep that chooses it."""

    key: str
    fields: dict[str, Any]  # the group's settings (see group_fields)
    candidates: tuple[float, ...]
    sweeps: tuple[RunConfig, ...]  # one per candidate, in the same order
    extend: int = 2  # extensions still allowed past an edge winner (Settings.extend)
    extensions: tuple[float, ...] = ()  # the candidates added past an edge, in order


def make_group(template: RunConfig, rates: Sequence[float], base: Mapping[str, Any],
               settings: Settings, seed: int) -> Group:
    """The group of ``template`` and its sweep runs in the ``base`` federation setting."""
    federation = {k: base.get(k, getattr(RunConfig, k)) for k in FEDERATION}
    rounds = settings.rounds or federation["rounds"]
    sweep = template.replace(**(federation | {"rounds": rounds}), mode="fl", eval_every=rounds,
                             seed=seed, val_fraction=settings.val_fraction)
    return Group(group_key(template), group_fields(template), tuple(rates),
                 tuple(sweep.replace(lr=rate) for rate in rates), settings.extend)


def beyond(candidates: Sequence[float], winner: float | None) -> float | None:
    """The rate one step past the edge ``winner`` sits at (None: not at an edge).

    The step is the ratio of the two outermost candidates on that side, rounded to six
    significant digits so that the rate, and the run's hash, is the same everywhere.
    """
    if winner is None or len(candidates) < 2:
        return None
    low, high = candidates[0], candidates[-1]
    if winner == high:
        return float(f"{high * high / candidates[-2]:.6g}")
    if winner == low:
        return float(f"{low * low / candidates[1]:.6g}")
    return None


def extend(group: Group, results: str | os.PathLike) -> Group:
    """``group`` with the candidates its finished sweeps call for past an edge winner.

    While every sweep run has a record and the winner is the smallest or largest
    candidate, one candidate one step beyond it is added (:func:`beyond`), at most
    ``group.extend`` times. The returned group's sweeps may include runs not run yet.
    """
    from fedtune_core.runs import store

    for _ in range(group.extend):
        records = [store.read_record(store.record_path(results, cfg)) for cfg in group.sweeps]
        if any(r is None for r in records):
            break
        new = beyond(group.candidates, choose(records)[0])
        if new is None:
            break
        rates = tuple(sorted((*group.candidates, new)))
        sweeps = {c.lr: c for c in group.sweeps} | {new: group.sweeps[0].replace(lr=new)}
        group = replace(group, candidates=rates, sweeps=tuple(sweeps[r] for r in rates),
                        extend=group.extend - 1, extensions=(*group.extensions, new))
    return group


def sweeps(groups: Iterable[Group], results: str | os.PathLike) -> list[RunConfig]:
    """Every sweep run the groups need so far, extensions included (:func:`extend`)."""
    return [cfg for group in groups for cfg in extend(group, results).sweeps]


@dataclass(frozen=True)
class Choice:
    """The outcome of one group's sweep."""

    group: Group
    lr: float | None  # None: no candidate finished
    scores: list[dict[str, Any]] = field(default_factory=list)  # per candidate, see choose


def choose(records: Sequence[Mapping[str, Any]]) -> tuple[float | None, list[dict[str, Any]]]:
    """The best rate among sweep records, and each candidate's score.

    Only validation metrics are read (``final.val_acc``, ``final.val_loss``): whatever else
    a record holds never enters the choice. Best final validation accuracy wins; ties go to
    the lower validation loss, then to the smaller rate. Failed runs cannot win.

    Raises:
        ValueError: a record that is not a validation run (``val_fraction`` not > 0).
    """
    scores = []
    for rec in records:
        cfg = rec["config"]
        if not cfg.get("val_fraction", 0) > 0:
            raise ValueError(f"record {rec.get('hash')} is not a validation run; only sweep "
                             "runs (val_fraction > 0) can choose a learning rate")
        final = rec.get("final") or {}
        ok = rec.get("status") == "ok" and isinstance(final.get("val_acc"), int | float)
        scores.append({"lr": cfg["lr"], "status": rec.get("status"),
                       "val_acc": final.get("val_acc") if ok else None,
                       "val_loss": final.get("val_loss") if ok else None,
                       "wall_seconds": rec.get("wall_seconds"),
                       "samples": final.get("samples_processed")})
    eligible = [s for s in scores if s["val_acc"] is not None]
    if not eligible:
        return None, scores
    best = min(eligible, key=_rank)
    return best["lr"], scores


def _rank(score: dict[str, Any]) -> tuple[float, float, float]:
    """Sort key: higher validation accuracy, then lower (finite) loss, then smaller rate."""
    loss = score["val_loss"]
    return -score["val_acc"], loss if is_number(loss) else math.inf, score["lr"]


def decide(groups: Iterable[Group], results: str | os.PathLike) -> dict[str, Choice]:
    """The choice of every group whose sweep runs all have a record under ``results``.

    Each group is first extended past an edge winner (:func:`extend`); groups with a
    missing sweep record are left out (their rate is pending).
    """
    from fedtune_core.runs import store

    out = {}
    for group in groups:
        group = extend(group, results)
        records = [store.read_record(store.record_path(results, cfg)) for cfg in group.sweeps]
        if any(r is None for r in records):
            continue
        lr, scores = choose(records)
        out[group.key] = Choice(group, lr, scores)
    return out


def rates(choices: Mapping[str, Choice]) -> dict[str, float]:
    """Group key -> chosen rate, for the groups that have one."""
    return {key: c.lr for key, c in choices.items() if c.lr is not None}

"""Profiles: a study's settings as data, expanded into the runs each experiment needs.

A profile is one TOML file (``fedtune_core/study/profiles/<name>.toml``, or any path): shared
``[base]`` settings, per-method learning rates, named method variants, seeds, and one list
of blocks per experiment. A block's list values are axes (their product is taken, then
crossed with the seeds); its scalar values are fixed settings. Experiments that need the
same configuration share its run through the cache.

A method's rate in ``[lr]`` is a number, or ``{ select = [candidates] }``: then it is
chosen on validation data by a short sweep per group of runs (:mod:`fedtune_core.study.selection`,
configured by ``[lr_selection]``), and those runs exist only once their group's rate is
known (:meth:`Profile.runs` with the chosen ``rates``; :meth:`Profile.pending` lists the
others).

A profile with a TOML error, a value of the wrong type or an unknown key is refused with one
line naming the file, the key and what is expected (:func:`check_schema`), and so is any
run configuration it expands to, before anything runs.
"""

from __future__ import annotations

import itertools
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune_core.checks import MAX_RUNS_ENV, max_runs
from fedtune_core.config import RunConfig
from fedtune_core.errors import SEED_MAX, ConfigError, check_choice, is_number
from fedtune_core.study import selection

PROFILE_DIR = Path(__file__).parent / "profiles"
EXPERIMENTS = ("tuning_methods", "clip_vs_vit", "few_shot", "fl_vs_local")


def profiles() -> list[str]:
    """Names of the profiles shipped with fedtune."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


@dataclass(frozen=True)
class Planned:
    """A run an experiment needs; while its rate is to be selected, ``cfg.lr`` is None."""

    cfg: RunConfig
    candidates: tuple[float, ...] | None = None  # rates to choose from (None: cfg is final)


@dataclass(frozen=True)
class Profile:
    """A parsed profile."""

    name: str
    description: str
    pretrained: bool  # whether its models carry pre-trained weights
    seeds: tuple[int, ...]
    base: dict[str, Any]
    lr: dict[str, float | tuple[float, ...]]  # method -> rate, or candidates to select from
    variants: dict[str, dict[str, Any]]
    experiments: dict[str, list[dict[str, Any]]]
    lr_selection: selection.Settings = selection.Settings()
    gpus_per_run: float = 1.0  # Ray on CUDA: the GPU share each run asks for (0 < x <= 1)
    # a rehearsal of another profile (fedtune_core.study.rehearsal): of, train_steps, eval_samples,
    # batch_size, data_dir (made absolute at load); None for a real study
    rehearsal: dict[str, Any] | None = None

    def planned(self, experiment: str | None = None) -> list[Planned]:
        """Every run ``experiment`` (all if None) needs, deduplicated, rates pending or not."""
        names = tuple(self.experiments) if experiment is None else (experiment,)
        seen: dict[tuple, Planned] = {}
        for name in names:
            if name not in self.experiments:
                raise ConfigError(f"unknown experiment {name!r} in profile {self.name!r}; "
                                  f"valid choices: {', '.join(self.experiments)}")
        self._check_size(names)
        for name in names:
            for i, block in enumerate(self.experiments[name], start=1):
                try:
                    plans = self._expand(block)
                except ConfigError as err:
                    raise ConfigError(f"[[{name}]] block {i}: {err}") from None
                for plan in plans:
                    seen.setdefault((plan.cfg.hash, plan.candidates), plan)
        return list(seen.values())

    def groups(self, experiment: str | None = None) -> list[selection.Group]:
        """The learning-rate groups (and their sweep runs) ``experiment`` needs."""
        seed = self.seeds[0] if self.lr_selection.seed is None else self.lr_selection.seed
        found: dict[str, selection.Group] = {}
        for plan in self.planned(experiment):
            if plan.candidates and selection.group_key(plan.cfg) not in found:
                group = selection.make_group(plan.cfg, plan.candidates, self.base,
                                             self.lr_selection, seed)
                found[group.key] = group
        return list(found.values())

    def sweeps(self, experiment: str | None = None) -> list[RunConfig]:
        """The sweep runs of :meth:`groups`."""
        return [cfg for group in self.groups(experiment) for cfg in group.sweeps]

    def runs(self, experiment: str | None = None,
             rates: Mapping[str, float] | None = None) -> list[RunConfig]:
        """The runs ``experiment`` needs whose rate is known, deduplicated.

        Runs with a fixed rate always; runs whose rate is selected once ``rates`` (group key
        -> chosen rate, see :func:`selection.decide`) holds their group's.
        """
        out: dict[str, RunConfig] = {}
        for plan in self.planned(experiment):
            if plan.candidates is None:
                out.setdefault(plan.cfg.hash, plan.cfg)
            elif (rate := (rates or {}).get(selection.group_key(plan.cfg))) is not None:
                cfg = plan.cfg.replace(lr=rate)
                out.setdefault(cfg.hash, cfg)
        return list(out.values())

    def pending(self, experiment: str | None = None,
                rates: Mapping[str, float] | None = None) -> list[RunConfig]:
        """The runs still waiting for their group's rate (``lr`` None in each)."""
        return [p.cfg for p in self.planned(experiment) if p.candidates is not None
                and selection.group_key(p.cfg) not in (rates or {})]

    def _check_size(self, names: tuple[str, ...]) -> None:
        """Count the runs of ``names`` before building any; refuse more than the cap."""
        cap = max_runs()
        total = 0
        for name in names:
            for block in self.experiments[name]:
                axes = {"seed": list(self.seeds)} | block
                total += math.prod(len(v) if isinstance(v, list) else 1 for v in axes.values())
        if total > cap:
            raise ConfigError(f"profile {self.name!r} expands to {total:,} runs, more than the "
                              f"cap of {cap:,}; shorten its lists, or set {MAX_RUNS_ENV}=N to "
                              "allow more")

    def _expand(self, block: dict[str, Any]) -> list[Planned]:
        block = {"seed": list(self.seeds)} | block
        axes = {k: v if isinstance(v, list) else [v] for k, v in block.items()}
        out = []
        for combo in itertools.product(*axes.values()):
            values = self.base | dict(zip(axes, combo, strict=True))
            variant = values.pop("variant", None)
            if variant is not None:
                if variant not in self.variants:
                    raise ConfigError(f"unknown variant {variant!r} in profile {self.name!r}; "
                                      f"valid choices: {', '.join(self.variants)}")
                values |= self.variants[variant]
            if values.get("mode", "fl") != "fl" and "engine" not in block:
                values["engine"] = "builtin"  # a profile's engine runs its FedAvg runs only
            method = values.get("method", RunConfig.method)
            rate = self.lr.get(method) if "lr" not in values else None
            if isinstance(rate, tuple):
                out.append(Planned(RunConfig.from_dict(values | {"lr": None}), rate))
                continue
            if rate is not None:
                values["lr"] = rate
            out.append(Planned(RunConfig.from_dict(values)))
        return out


def load_profile(name: str | os.PathLike) -> Profile:
    """Load a shipped profile by name, or a profile file by path.

    Raises:
        ConfigError: an unknown name, a file that is not valid TOML or not a profile
            (:func:`check_schema`), or a run configuration it expands to that is not valid;
            one line naming the file.
    """
    path = Path(name)
    if path.suffix != ".toml":
        path = PROFILE_DIR / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown profile {str(name)!r}; valid choices: "
                          f"{', '.join(profiles())}, or a path to a .toml profile file")
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"profile {path} cannot be read ({type(err).__name__})") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"profile {path} is not valid TOML: {err}") from None
    check_schema(raw, path)
    experiments = {k: raw.pop(k) for k in list(raw) if k in EXPERIMENTS}
    lr = {m: selection.candidates(m, v) or v for m, v in raw.get("lr", {}).items()}
    profile = Profile(path.stem, raw.get("description", ""), raw.get("pretrained", True),
                      tuple(raw.get("seeds", [0])), raw.get("base", {}), lr,
                      raw.get("variants", {}), experiments,
                      selection.Settings(**raw.get("lr_selection", {})),
                      raw.get("gpus_per_run", 1.0), _rehearsal(raw.get("rehearsal"), path))
    try:
        profile.groups()  # validate every configuration and sweep now, not mid-grid
    except ConfigError as err:
        raise ConfigError(f"profile {path}: {err}") from None
    return profile


def _rehearsal(table: dict[str, Any] | None, path: Path) -> dict[str, Any] | None:
    """A rehearsal profile's settings, its stand-in data folder relative to the file."""
    if table is None:
        return None
    return table | {"data_dir": str((path.parent / table.get("data_dir", "data")).resolve())}


def _rehearsal_table(value: Any) -> bool | str:
    """``[rehearsal]``: what a generated rehearsal profile rehearses, and how far it goes."""
    if not isinstance(value, dict):
        return True
    known = ("of", "train_steps", "eval_samples", "batch_size", "data_dir", "weights")
    if unknown := sorted(set(value) - set(known)):
        return (f"unknown key(s) {', '.join(unknown)} in [rehearsal]; valid keys: "
                f"{', '.join(known)}")
    for key in ("train_steps", "eval_samples", "batch_size"):
        if key in value and not (_is_int(value[key]) and value[key] >= 1):
            return f"rehearsal.{key} must be a whole number >= 1, got {value[key]!r}"
    return False


def check_schema(raw: dict[str, Any], path: str | os.PathLike) -> None:
    """Raise ConfigError (naming the file, the key and what is expected) unless ``raw``,
    a parsed TOML file, has a profile's shape: the keys of :data:`SCHEMA` and experiments.

    Each key has one small check (``SCHEMA``): it returns False when the value is fine,
    True when it has the wrong type (the message says what is expected), or a message.
    """
    known = set(SCHEMA) | set(EXPERIMENTS)
    if unknown := sorted(set(raw) - known):
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in profile {path}; valid keys: "
                          f"{', '.join(sorted(known))}")
    for key, value in raw.items():
        check, expected = SCHEMA.get(key, (_blocks, f"a list of blocks ([[{key}]] tables)"))
        problem = check(value)
        if problem is True:
            problem = f"{key} must be {expected}, got {value!r}"
        if problem:
            raise ConfigError(f"profile {path}: {problem}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _seeds(value: Any) -> bool | str:
    ok = (isinstance(value, list) and value
          and all(_is_int(v) and 0 <= v <= SEED_MAX for v in value))
    return not ok


def _table(value: Any) -> bool | str:
    return not isinstance(value, dict)


def _lr_table(value: Any) -> bool | str:
    """``[lr]``: tuning method = its learning rate (one small check per entry)."""
    if not isinstance(value, dict):
        return True
    for method, lr in value.items():
        if problem := check_lr(method, lr):
            return problem
    return False


def check_lr(method: str, lr: Any) -> str | None:
    """What is wrong with the ``[lr]`` entry ``method = lr`` (None: nothing)."""
    from fedtune_core import tuning

    try:
        check_choice("tuning method", method, tuning.METHODS)
    except ConfigError as err:
        return f"lr.{method}: {err}"
    if isinstance(lr, dict):
        try:
            selection.candidates(method, lr)
        except ConfigError as err:
            return f"lr.{method}: {err}"
        return None
    if not is_number(lr) or lr <= 0:
        return (f"lr.{method} must be a learning rate (a finite number > 0) or "
                f"{{ select = [candidate rates] }}, got {lr!r}")
    return None


def _lr_selection(value: Any) -> bool | str:
    """``[lr_selection]``: how candidate rates are compared (see selection.Settings)."""
    if not isinstance(value, dict):
        return True
    if unknown := sorted(set(value) - set(selection.SETTINGS)):
        return (f"unknown key(s) {', '.join(unknown)} in [lr_selection]; valid keys: "
                f"{', '.join(selection.SETTINGS)}")
    try:
        selection.Settings(**value)
    except ConfigError as err:
        return str(err)
    return False


def _variants(value: Any) -> bool | str:
    """``[variants]``: name = a table of run settings, e.g. ``{ method = "prompt" }``."""
    if not isinstance(value, dict):
        return True
    for name, settings in value.items():
        if not isinstance(settings, dict):
            return (f"variants.{name} must be a table of run settings such as "
                    f'{{ method = "{name}" }}, got {settings!r}')
    return False


def _blocks(value: Any) -> bool | str:
    if not isinstance(value, list) or not value or not all(isinstance(b, dict) for b in value):
        return True
    for block in value:
        for key, axis in block.items():
            if isinstance(axis, list) and not axis:
                return (f"{key} = [] in a block: an axis needs at least one value (an empty "
                        "one gives no runs)")
    return False


# key: (check returning False if fine, True or a message if not; what is expected)
SCHEMA = {
    "description": (lambda v: not isinstance(v, str), "a string"),
    "pretrained": (lambda v: not isinstance(v, bool), "true or false"),
    "seeds": (_seeds, f"a non-empty list of integers from 0 to {SEED_MAX}"),
    "base": (_table, "a table of run settings ([base])"),
    "lr": (_lr_table, "a table of tuning method = learning rate or { select = [rates] } ([lr])"),
    "lr_selection": (_lr_selection, "a table of val_fraction, rounds, seed ([lr_selection])"),
    "variants": (_variants, "a table of name = { run settings } ([variants])"),
    "gpus_per_run": (lambda v: isinstance(v, bool) or not isinstance(v, int | float)
                     or not 0 < v <= 1, "a number > 0 and <= 1 (the GPU share of a run)"),
    "rehearsal": (_rehearsal_table, "a table ([rehearsal], written by fedtune grid --rehearse)"),
}

"""Profiles: a study's settings as data, expanded into the runs each experiment needs.

A profile is one TOML file (``fedtune_core/profiles/<name>.toml``, or any path): shared
``[base]`` settings, per-method learning rates, named method variants, seeds, and one list
of blocks per experiment. A block's list values are axes (their product is taken, then
crossed with the seeds); its scalar values are fixed settings. Experiments that need the
same configuration share its run through the cache.
"""

from __future__ import annotations

import itertools
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune_core.config import RunConfig
from fedtune_core.errors import ConfigError

PROFILE_DIR = Path(__file__).parent / "profiles"
EXPERIMENTS = ("tuning_methods", "clip_vs_vit", "few_shot", "fl_vs_local")


def profiles() -> list[str]:
    """Names of the profiles shipped with fedtune."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


@dataclass(frozen=True)
class Profile:
    """A parsed profile."""

    name: str
    description: str
    pretrained: bool  # whether its models carry pre-trained weights
    seeds: tuple[int, ...]
    base: dict[str, Any]
    lr: dict[str, float]
    variants: dict[str, dict[str, Any]]
    experiments: dict[str, list[dict[str, Any]]]

    def runs(self, experiment: str | None = None) -> list[RunConfig]:
        """The configurations ``experiment`` needs (all experiments if None), deduplicated."""
        names = tuple(self.experiments) if experiment is None else (experiment,)
        seen: dict[str, RunConfig] = {}
        for name in names:
            if name not in self.experiments:
                raise ConfigError(f"unknown experiment {name!r} in profile {self.name!r}; "
                                  f"valid choices: {', '.join(self.experiments)}")
            for block in self.experiments[name]:
                for cfg in self._expand(block):
                    seen.setdefault(cfg.hash, cfg)
        return list(seen.values())

    def _expand(self, block: dict[str, Any]) -> list[RunConfig]:
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
            method = values.get("method", RunConfig.method)
            if "lr" not in values and method in self.lr:
                values["lr"] = self.lr[method]
            out.append(RunConfig.from_dict(values))
        return out


def load_profile(name: str | os.PathLike) -> Profile:
    """Load a shipped profile by name, or a profile file by path."""
    path = Path(name)
    if path.suffix != ".toml":
        path = PROFILE_DIR / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown profile {str(name)!r}; valid choices: "
                          f"{', '.join(profiles())}, or a path to a .toml profile file")
    raw = tomllib.loads(path.read_text())
    experiments = {k: raw.pop(k) for k in list(raw) if k in EXPERIMENTS}
    known = {"description", "pretrained", "seeds", "base", "lr", "variants"}
    if unknown := sorted(set(raw) - known):
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in profile {path}; valid keys: "
                          f"{', '.join(sorted(known | set(EXPERIMENTS)))}")
    profile = Profile(path.stem, raw.get("description", ""), bool(raw.get("pretrained", True)),
                      tuple(raw.get("seeds", [0])), raw.get("base", {}), raw.get("lr", {}),
                      raw.get("variants", {}), experiments)
    profile.runs()  # validate every configuration now, not halfway through a grid
    return profile

"""Profiles (data) expanded into the runs each experiment needs; running them with the cache.

A profile is one TOML file (``fedtune_core/profiles/<name>.toml``, or any path): shared
``[base]`` settings, per-method learning rates, named method variants, seeds, and one list
of blocks per experiment. A block's list values are axes (their product is taken, then
crossed with the seeds); its scalar values are fixed settings. Experiments that need the
same configuration share its run through the cache.
"""

from __future__ import annotations

import itertools
import os
import sys
import tomllib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
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


def default_results(profile: Profile, given: str | os.PathLike | None = None) -> Path:
    """``given`` if set, else ``results/<profile>`` under the current directory."""
    return Path(given) if given else Path("results") / profile.name


def plan(profile: Profile, results: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """Per experiment, and for all of them once each: (runs needed, of which cached)."""
    from fedtune_core import results as res

    def count(cfgs: list[RunConfig]) -> tuple[int, int]:
        return len(cfgs), sum(res.cached(results, c) is not None for c in cfgs)

    out = {name: count(profile.runs(name)) for name in profile.experiments}
    out["all (unique)"] = count(profile.runs())
    return out


def _run_one(cfg: RunConfig, results: str, device: str | None, data_root: str | None,
             force: bool, progress: bool = False) -> dict:
    from fedtune_core import results as res

    return res.run(cfg, results, device=device, data_root=data_root, force=force,
                   progress=progress, record_config_errors=True)


def ensure(profile: Profile, results: str | os.PathLike, experiment: str | None = None, *,
           device: str | None = None, data_root: str | None = None, force: bool = False,
           jobs: int = 1, progress: bool = True) -> list[dict]:
    """Make sure every run of ``experiment`` (or all) has a record; return the records.

    Cached runs are skipped; the others run (``jobs`` processes at a time), each written
    the moment it ends, so an interrupted grid resumes where it stopped. Failed runs are
    recorded as failed and the grid goes on.
    """
    from tqdm import tqdm

    from fedtune_core import results as res
    from fedtune_core.fl import set_cpu_threads

    set_cpu_threads()
    cfgs = profile.runs(experiment)
    todo = cfgs if force else [c for c in cfgs if res.cached(results, c) is None]
    print(f"{profile.name}/{experiment or 'all'}: {len(cfgs)} runs, "
          f"{len(cfgs) - len(todo)} cached, {len(todo)} to run", flush=True)
    bar = tqdm(total=len(todo), desc="runs", unit="run", disable=not progress or not todo)
    args = (str(results), device, data_root, force)
    if jobs > 1 and len(todo) > 1:
        with ProcessPoolExecutor(jobs, initializer=set_cpu_threads) as pool:
            futures = [pool.submit(_run_one, c, *args) for c in todo]
            for future in as_completed(futures):
                future.result()
                bar.update()
    else:
        for cfg in todo:
            _run_one(cfg, *args, progress=progress)  # with a bar over its rounds
            bar.update()
    bar.close()
    return collect(profile, results, experiment)


def collect(profile: Profile, results: str | os.PathLike,
            experiment: str | None = None) -> list[dict]:
    """The records that exist for ``experiment`` (or all), computing nothing."""
    from fedtune_core import results as res

    records = (res.read_record(res.record_path(results, c)) for c in profile.runs(experiment))
    return [r for r in records if r is not None]


def default_jobs(device: str | None) -> int:
    """Parallel runs: one on a GPU; on CPU one per core, at most four."""
    from fedtune_core.fl import pick_device

    return 1 if pick_device(device).type != "cpu" else max(1, min(os.cpu_count() or 1, 4))


def failed(records: Sequence[dict]) -> list[dict]:
    """The records whose run failed."""
    return [r for r in records if r.get("status") != "ok"]


def cmd_grid(args) -> int:
    from fedtune_core.fl import pick_device

    pick_device(args.device)
    profile = load_profile(args.profile)
    results = default_results(profile, args.results)
    if args.dry_run:
        for name, (total, hit) in plan(profile, results).items():
            print(f"{name:<16}{total:>6} runs{hit:>6} cached{total - hit:>6} to run")
        return 0
    records = ensure(profile, results, args.experiment, device=args.device,
                     data_root=args.data_dir, force=args.force,
                     jobs=args.jobs or default_jobs(args.device),
                     progress=not args.quiet)
    bad = failed(records)
    for rec in bad:
        print(f"failed: {rec['hash']} ({rec['config']['model']}, {rec['config']['method']}, "
              f"{rec['config']['partition']}, {rec['config']['mode']}): {rec['error']}",
              file=sys.stderr)
    print(f"{len(records) - len(bad)} ok, {len(bad)} failed; records in {results / 'runs'}")
    return 1 if bad else 0


def cmd_index(args) -> int:
    from fedtune_core import report

    profile = load_profile(args.profile)
    folder = default_results(profile, args.results)
    by_experiment = {name: collect(profile, folder, name) for name in profile.experiments}
    print(report.write_index(folder, profile, report.findings(profile, by_experiment)))
    return 0


def add_parser(sub) -> None:
    """Attach ``fedtune grid`` to the CLI's sub-parsers."""
    p = sub.add_parser("grid", help="run (or --dry-run: count) every run a profile needs")
    p.add_argument("--profile", default="demo", help=f"one of {', '.join(profiles())}, or a path")
    p.add_argument("--experiment", default=None, choices=EXPERIMENTS, help="only this one")
    p.add_argument("--results", default=None, help="results folder (default results/<profile>)")
    p.add_argument("--dry-run", action="store_true", help="list runs needed, cached, to run")
    p.add_argument("--force", action="store_true", help="recompute cached runs")
    p.add_argument("--jobs", type=int, default=0,
                   help="runs in parallel processes (default 0: 1 on GPU, one per core on CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda ...")
    p.add_argument("--data-dir", default=None, help="dataset folder ($FEDTUNE_DATA_DIR, ./data)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_grid)

    p = sub.add_parser("index", help="write <results>/index.html: findings and links")
    p.add_argument("--profile", default="demo", help=f"one of {', '.join(profiles())}, or a path")
    p.add_argument("--results", default=None, help="results folder (default results/<profile>)")
    p.set_defaults(func=cmd_index)

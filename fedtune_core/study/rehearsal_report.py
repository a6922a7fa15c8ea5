"""``fedtune grid --rehearse``: run a profile's rehearsal, then say what broke and what the
whole profile will cost on this machine.

The shape table has one row per rehearsal run (learning-rate sweeps included): status
(the error in one line for a failure), seconds per training step after one warm-up, peak
memory. The cost table multiplies the images each run of the real profile processes
(:func:`fedtune_core.study.cost.images`, what ``benchmarks/gpu_hours.py`` counts) by the seconds
per trained and per forwarded image measured on that run's shape; where a shape has no
measurement, the anchored estimate (:func:`fedtune_core.study.cost.gpu_hours`) stands in, marked.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from fedtune_core import files
from fedtune_core.config import RunConfig
from fedtune_core.errors import check_int
from fedtune_core.fl import partition
from fedtune_core.runs import store
from fedtune_core.study import cost, grid, rehearsal, tidy
from fedtune_core.study.profile import Profile

Key = tuple[str, str, str, str, str, str]  # dataset, model, method, mode, partition kind, kind


def shape(cfg: RunConfig) -> Key:
    """What makes runs alike for the rehearsal: their shape (rates, seeds, sizes aside)."""
    return (cfg.dataset, cfg.model, tidy.method_label(cfg.to_dict()), cfg.mode,
            partition.parse(cfg.partition).kind, "sweep" if cfg.val_fraction else "run")


@dataclass
class Row:
    """One rehearsal run: its shape, how it ended, what it measured."""

    key: Key
    status: str  # ok, failed, not run
    error: str = ""
    batch: int = 0
    s_per_step: float | None = None
    s_per_forward: float | None = None
    peak_bytes: int | None = None
    peak_kind: str = ""


def rows(profile: Profile, folder: str | Path, experiment: str | None = None) -> list[Row]:
    """Every shape of the rehearsal ``profile`` (of ``experiment``, or all) and its outcome."""
    chosen = grid.rates(profile, folder, experiment)
    out = []
    cfgs = profile.sweeps(experiment) + profile.runs(experiment, chosen)
    for cfg in {c.hash: c for c in cfgs}.values():  # a shape may run with several weights
        rec = store.read_record(store.record_path(folder, cfg))
        if rec is None:
            out.append(Row(shape(cfg), "not run", "no record"))
            continue
        measured = rec.get("rehearsal") or {}
        error = (rec.get("error") or "").strip().splitlines()
        out.append(Row(shape(cfg), rec["status"], error[0] if error else "", cfg.batch_size,
                       measured.get("s_per_step"), measured.get("s_per_forward_image"),
                       measured.get("peak_memory_bytes"), measured.get("peak_memory_kind", "")))
    for cfg in profile.pending(experiment, chosen):
        out.append(Row(shape(cfg), "not run", "no learning rate: every sweep run of its "
                                              "group failed"))
    return out


def shape_table(table: list[Row], device: str) -> str:
    """The rows as a fixed-width text table."""
    head = (f"{'dataset':<10}{'model':<14}{'method':<14}{'mode':<9}{'partition':<11}"
            f"{'kind':<7}{'status':<9}{'s/step':>9}{'peak MB':>10}  error")
    lines = [f"Rehearsal shapes on {device}: seconds per training step after one warm-up "
             f"(batch {table[0].batch if table else '-'}), peak memory "
             f"({next((r.peak_kind for r in table if r.peak_kind), '-')})", head]
    for r in table:
        step = f"{r.s_per_step:.3f}" if r.s_per_step is not None else "-"
        peak = f"{r.peak_bytes / 2**20:,.0f}" if r.peak_bytes else "-"
        lines.append("".join(f"{v:<{w}}" for v, w in zip(r.key, (10, 14, 14, 9, 11, 7),
                                                          strict=True))
                     + f"{r.status:<9}{step:>9}{peak:>10}  {r.error[:160]}")
    return "\n".join(lines)


def projection(source: Profile, table: list[Row],
               data_root: str | None = None) -> dict[str, dict[str, list[float]]]:
    """Experiment -> backbone -> [runs, hours, runs on the anchor's estimate] of ``source``."""
    measured = {r.key: r for r in table if r.status == "ok" and r.s_per_step is not None
                and r.s_per_forward is not None}
    groups = {name: [p.cfg for p in source.planned(name)] for name in source.experiments}
    groups["lr sweeps"] = source.sweeps()
    groups["all (unique)"] = [p.cfg for p in source.planned()] + source.sweeps()
    sizes: dict[str, tuple[int, int, int]] = {}
    out: dict[str, dict[str, list[float]]] = {}
    for name, cfgs in groups.items():
        cells: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0])
        for cfg in cfgs:
            if cfg.dataset not in sizes:
                sizes[cfg.dataset] = cost.SIZES.get(cfg.dataset) or _sizes(cfg, data_root)
            cell, m = cells[cfg.model], measured.get(shape(cfg))
            cell[0] += 1
            if m is not None:
                trained, forwarded = cost.images(cfg, sizes[cfg.dataset])
                cell[1] += (trained * m.s_per_step / m.batch + forwarded * m.s_per_forward) / 3600
            elif cfg.model in cost.FWD_GFLOPS and cfg.dataset in cost.SIZES:
                cell[1] += cost.gpu_hours(cfg)
                cell[2] += 1
            else:
                cell[1] = float("nan")
                cell[2] += 1
        out[name] = dict(cells)
    return out


def _sizes(cfg: RunConfig, data_root: str | None) -> tuple[int, int, int]:
    from fedtune_core.fl import data

    dataset = data.load(cfg.dataset, data_root)
    return len(dataset.train), len(dataset.test), len(dataset.class_names)


def cost_table(source: Profile, table: list[Row], device: str,
               data_root: str | None = None) -> str:
    """The projected hours of the whole ``source`` profile as a text table."""
    proj = projection(source, table, data_root)
    models = sorted({m for cells in proj.values() for m in cells})
    lines = [f"Projected cost of profile {source.name} on {device} (hours: the images each run "
             "processes x the seconds per image measured on its shape; * = some runs on the "
             "anchored estimate of benchmarks/gpu_hours.py, no measurement)",
             f"{'experiment':<16}{'runs':>6}" + "".join(f"{m:>16}" for m in models)
             + f"{'all':>12}"]
    for name, cells in proj.items():
        row = f"{name:<16}{sum(c[0] for c in cells.values()):>6.0f}"
        for m in models:
            c = cells.get(m)
            row += f"{_hours(c[1]) + ('*' if c[2] else ' '):>16}" if c else f"{'':>16}"
        total = sum(c[1] for c in cells.values())
        row += f"{_hours(total) + ('*' if any(c[2] for c in cells.values()) else ' '):>12}"
        lines.append(row)
    return "\n".join(lines)


def _hours(h: float) -> str:
    return "-" if h != h else f"{h:,.2f}"


def cmd_rehearse(args, source: Profile) -> int:
    """``fedtune grid --profile P --rehearse``: exit 0 only if every shape ran."""
    from fedtune_core.checks import check_results_folder
    from fedtune_core.errors import ConfigError

    if source.rehearsal:
        raise ConfigError(f"profile {source.name!r} is already a rehearsal; rehearse the "
                          f"profile it was made from ({source.rehearsal.get('of')!r})")
    folder = rehearsal.folder_for(source, args.results)
    if args.rehearse_batch is not None:
        check_int("--rehearse-batch", args.rehearse_batch, 1, 65_536)
    check_results_folder(folder)
    from fedtune_core.fl.training import pick_device

    device = pick_device(None if args.backend == "ray" else args.device)
    batch = args.rehearse_batch or (rehearsal.CPU_BATCH if device.type == "cpu" else
                                    source.base.get("batch_size", RunConfig.batch_size))
    grid._log_to_stdout()
    t0 = time.perf_counter()
    profile = rehearsal.prepare(source, folder, args.data_dir, batch)
    if args.dry_run:
        for name, (total, hit, _) in grid.plan(profile, folder).items():
            print(f"{name:<16}{total:>6} runs{hit:>6} cached{total - hit:>6} to run")
        return 0
    grid.ensure(profile, folder, args.experiment, device=args.device, force=args.force,
                retry_failed=args.retry_failed,
                jobs=args.jobs or grid.default_jobs(args.device, args.backend),
                progress=not args.quiet, backend=args.backend, address=args.address,
                gpus_per_run=args.gpus_per_run)
    table = rows(profile, folder, args.experiment)
    where = f"{device.type} ({_hardware(device)})"
    text = "\n\n".join([shape_table(table, where), cost_table(source, table, where,
                                                               args.data_dir)])
    files.write_text(Path(folder, "rehearsal.txt"), text + "\n")
    print(text)
    bad = [r for r in table if r.status != "ok"]
    for r in bad:
        print(f"failed shape: {' / '.join(r.key)}: {r.error}", file=sys.stderr)
    print(f"rehearsal of {source.name}: {len(table) - len(bad)} of {len(table)} shapes ok in "
          f"{time.perf_counter() - t0:.0f} s; records in {Path(folder, 'runs')}; tables in "
          f"{Path(folder, 'rehearsal.txt')}")
    return 1 if bad else 0


def _hardware(device) -> str:
    import os

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"

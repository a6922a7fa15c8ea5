"""Running a profile's runs with the cache: ``fedtune grid`` and ``fedtune index``.

Profiles themselves (parsing, expansion into run configurations) live in
:mod:`fedtune_core.study.profile`. Cached runs are skipped; the rest run in parallel processes and
each record is written the moment its run ends, so an interrupted grid resumes.

Where a profile selects learning rates, a grid runs in three phases: the sweep runs of the
groups it needs, the choice of each group's rate from their validation metrics
(:mod:`fedtune_core.study.selection`), then the runs at the chosen rates.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from fedtune_core.config import RunConfig
from fedtune_core.study import selection
from fedtune_core.study.profile import EXPERIMENTS, Profile, load_profile, profiles

log = logging.getLogger(__name__)


def default_results(profile: Profile, given: str | os.PathLike | None = None) -> Path:
    """``given`` if set, else ``results/<profile>`` under the current directory."""
    return Path(given) if given else Path("results") / profile.name


def plan(profile: Profile, results: str | os.PathLike,
         retry_failed: bool = False) -> dict[str, tuple[int, int, int]]:
    """Learning-rate sweeps, each experiment, all runs once each: (runs, cached, pending).

    Cached: a record that spares the run (ok, or diverged unless ``retry_failed``). Pending:
    a run whose group's learning rate is not chosen yet (its sweep has not run); pending
    runs count as to run.
    """
    from fedtune_core.runs import store

    chosen = rates(profile, results)

    def count(cfgs: list[RunConfig], pending: int = 0) -> tuple[int, int, int]:
        hit = sum(store.kept(results, c, retry_failed=retry_failed) is not None for c in cfgs)
        return len(cfgs) + pending, hit, pending

    out = {"lr sweeps": count(selection.sweeps(profile.groups(), results))}
    for name in profile.experiments:
        out[name] = count(profile.runs(name, chosen), len(profile.pending(name, chosen)))
    pending = len({c.hash for c in profile.pending(None, chosen)})
    out["all (unique)"] = count(selection.sweeps(profile.groups(), results)
                                + profile.runs(None, chosen), pending)
    return out


def rates(profile: Profile, results: str | os.PathLike,
          experiment: str | None = None) -> dict[str, float]:
    """The chosen rate of every group of ``experiment`` whose sweep is complete."""
    return selection.rates(selection.decide(profile.groups(experiment), results))


def ensure(profile: Profile, results: str | os.PathLike, experiment: str | None = None, *,
           device: str | None = None, data_root: str | None = None, force: bool = False,
           retry_failed: bool = False, jobs: int = 1, progress: bool = True,
           backend: str = "pool", address: str | None = None,
           gpus_per_run: float | None = None) -> list[dict]:
    """Make sure every run of ``experiment`` (or all) has a record; return the records.

    First the learning-rate sweeps it needs, then its runs at the chosen rates (a group
    whose every sweep run failed has no rate: its runs are left out, :func:`no_rate` names
    it). Cached runs are skipped (and diverged ones unless ``retry_failed``); the others
    are first checked (:func:`fedtune_core.study.preflight.check`: one line if one cannot start),
    then run (``jobs`` processes at a time), each written the moment it ends, so an
    interrupted grid resumes where it stopped. Runs go to ``backend`` (``pool``: ``jobs``
    local processes; ``ray``: a Ray instance, local or at ``address``, each run asking for
    ``gpus_per_run`` GPUs on CUDA, default the profile's); records are written here alone.
    Failed runs, including runs whose worker died, are recorded as failed and the grid goes
    on. A run that another process (another grid on this folder) is computing is
    skipped at first, then waited for, and its record used. The counts of runs, cached and
    to run, are logged (``fedtune grid`` prints them; a notebook's report stays free of
    them).
    """
    from fedtune_core.errors import in_notebook
    from fedtune_core.fl.training import set_cpu_threads
    from fedtune_core.runs import backends, store

    if profile.rehearsal:  # its stand-in data, and every run capped (see limits.py)
        with _rehearsal_limits(profile):
            return ensure(replace(profile, rehearsal=None), results, experiment,
                          device=device, data_root=profile.rehearsal["data_dir"],
                          force=force, retry_failed=retry_failed, jobs=jobs,
                          progress=progress, backend=backend, address=address,
                          gpus_per_run=gpus_per_run)
    progress = progress and not in_notebook()  # no bars (escape codes) in a report's cells
    set_cpu_threads()
    where = backends.Placement(device, data_root, jobs, address,
                               gpus_per_run or profile.gpus_per_run)
    # bad backend settings: one line before anything else; then one set of workers (or one
    # Ray instance) for every phase
    with backends.Session(backend, where) as runner:
        store.clean_stale(Path(results, "runs"))
        options = dict(data_root=data_root, force=force, retry_failed=retry_failed,
                       progress=progress, runner=runner)
        _ensure_sweeps(profile, results, experiment, options)
        cfgs = profile.runs(experiment, rates(profile, results, experiment))
        _ensure_runs(cfgs, results, f"{profile.name}/{experiment or 'all'}", **options)
    return collect(profile, results, experiment)


def _ensure_sweeps(profile: Profile, results: str | os.PathLike, experiment: str | None,
                   options: dict) -> None:
    """The learning-rate sweeps, then each extension past an edge winner that they call
    for (:func:`fedtune_core.study.selection.extend`), until no group needs another."""
    groups, done = profile.groups(experiment), 0
    label = f"{profile.name}/lr sweeps"
    while len(sweeps := selection.sweeps(groups, results)) > done:
        _ensure_runs(sweeps, results, label, **options)
        done, label = len(sweeps), f"{profile.name}/lr sweeps, extended past an edge"


@contextlib.contextmanager
def _rehearsal_limits(profile: Profile):
    """The rehearsal's caps in the environment, where every worker reads them."""
    from fedtune_core.fl import limits

    caps = limits.Limits(profile.rehearsal["train_steps"], profile.rehearsal["eval_samples"])
    before = os.environ.get(limits.ENV)
    os.environ[limits.ENV] = caps.to_env()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(limits.ENV, None)
        else:
            os.environ[limits.ENV] = before


def _ensure_runs(cfgs: list[RunConfig], results: str | os.PathLike, label: str, *,
                 data_root: str | None, force: bool, retry_failed: bool, progress: bool,
                 runner) -> None:
    """Check, then run on ``runner`` (a :class:`~fedtune_core.runs.backends.Session`) every
    config of ``cfgs`` without a record that spares it; write each record here as its run
    ends.

    The pre-trained checkpoints they need that are missing are built by the same workers,
    longest first, as steps (:class:`~fedtune_core.runs.backends.Step`: the glyph corpus,
    then each checkpoint): a run starts once its checkpoint is there, and runs that need
    none (random init) fill the workers that pre-training leaves idle.

    This process holds each run's lock from its start to its record: a run another process
    (another grid on this folder) is computing is skipped at first, then waited for, and
    its record used."""
    from tqdm import tqdm

    from fedtune_core import recipes
    from fedtune_core.runs import claims
    from fedtune_core.study import cost, preflight, pretraining

    todo = claims.pending(cfgs, results, force=force, retry_failed=retry_failed)
    log.info("%s: %d runs, %d cached, %d to run", label, len(cfgs), len(cfgs) - len(todo),
             len(todo))
    needed = recipes.needed((c.model, c.weights) for c in todo)
    building = [p for p in needed if recipes.cached(*p) is None]
    steps = pretraining.steps(building, progress, max(runner.where.jobs, 1))
    preflight.check(todo, data_root, building)
    todo = cost.longest_first(todo)  # no worker idles at the end waiting for a long run
    bar = tqdm(total=len(todo), desc="runs", unit="run", disable=not progress or not todo)
    claims.ensure(todo, results, lambda cfgs, claim: runner.run(cfgs, progress, claim, **steps()),
                  force=force, retry_failed=retry_failed, done=lambda cfg: bar.update())
    bar.close()


class Records(list):
    """The records of a profile's runs (a list of dicts), and ``absent``: the runs it plans
    that have no valid record, as ``(config, why)`` pairs, for the page to say so."""

    absent: list[tuple[RunConfig, str]]


def collect(profile: Profile, results: str | os.PathLike,
            experiment: str | None = None) -> Records:
    """The records that exist for ``experiment`` (or all), computing nothing; the runs
    without a valid record are in ``.absent`` (see :func:`absent`).

    Sweep runs are not among them (see :func:`fedtune_core.study.report.lr_sweeps`).
    """
    from fedtune_core.runs import store

    chosen = rates(profile, results, experiment)
    found, missing = Records(), []
    for cfg in profile.runs(experiment, chosen):
        path = store.record_path(results, cfg)
        if (record := store.read_record(path)) is not None:
            found.append(record)
        else:
            missing.append((cfg, "invalid record" if os.path.lexists(path) else "no record"))
    found.absent = missing + [(cfg, "learning rate not chosen: its sweep is incomplete")
                              for cfg in profile.pending(experiment, chosen)]
    return found


def absent(profile: Profile, results: str | os.PathLike,
           experiment: str | None = None) -> list[tuple[RunConfig, str]]:
    """The runs ``experiment`` (or all) plans whose record is missing or invalid, or whose
    learning rate is not chosen yet, with why: ``(config, why)``."""
    return collect(profile, results, experiment).absent


def no_rate(profile: Profile, results: str | os.PathLike,
            experiment: str | None = None) -> list[selection.Choice]:
    """Groups whose sweep finished without a usable candidate (every run failed)."""
    choices = selection.decide(profile.groups(experiment), results)
    return [c for c in choices.values() if c.lr is None]


def default_jobs(device: str | None, backend: str = "pool") -> int:
    """Parallel runs of the pool: one per GPU; on CPU one per core, at most four.

    Ray: 0, i.e. every CPU of a local instance (on a cluster, Ray's own resources decide).
    """
    import torch

    from fedtune_core.fl.training import pick_device

    if backend == "ray":
        return 0
    if pick_device(device).type != "cpu":
        return max(1, torch.cuda.device_count())
    return max(1, min(os.cpu_count() or 1, 4))


def failed(records: Sequence[dict]) -> list[dict]:
    """The records whose run failed."""
    return [r for r in records if r.get("status") != "ok"]


def cmd_grid(args) -> int:
    from fedtune_core.checks import check_results_folder

    profile = load_profile(args.profile)
    results = default_results(profile, args.results)
    _log_to_stdout()
    if args.dry_run:
        for name, (total, hit, pending) in plan(profile, results, args.retry_failed).items():
            note = f" ({pending} with rates pending)" if pending else ""
            print(f"{name:<16}{total:>6} runs{hit:>6} cached{total - hit:>6} to run{note}")
        return 0
    check_results_folder(results)
    from fedtune_core.fl.training import pick_device  # torch: only once the arguments are checked

    if args.backend != "ray":  # with Ray the device is the workers'
        pick_device(args.device)
    records = ensure(profile, results, args.experiment, device=args.device,
                     data_root=args.data_dir, force=args.force, retry_failed=args.retry_failed,
                     jobs=args.jobs or default_jobs(args.device, args.backend),
                     progress=not args.quiet, backend=args.backend, address=args.address,
                     gpus_per_run=args.gpus_per_run)
    bad = failed(records)
    for rec in bad:
        print(f"failed: {rec['hash']} ({rec['config']['model']}, {rec['config']['method']}, "
              f"{rec['config']['partition']}, {rec['config']['mode']}): {rec['error']}",
              file=sys.stderr)
    stuck = no_rate(profile, results, args.experiment)
    for choice in stuck:
        fields = choice.group.fields
        print(f"failed: no learning rate for {fields['model']} / {fields['method']} on "
              f"{fields['dataset']}: every sweep run failed ({choice.group.key})",
              file=sys.stderr)
    kept = sum(rec.get("failure") == "diverged" for rec in bad)
    note = f" ({kept} diverged, kept: --retry-failed runs them again)" if kept else ""
    print(f"{len(records) - len(bad)} ok, {len(bad)} failed{note}; records in "
          f"{results / 'runs'}")
    return 1 if bad or stuck else 0


class _Print(logging.Handler):
    """Prints a log message to the current ``sys.stdout``."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), flush=True)


def _log_to_stdout() -> None:
    """Show fedtune's info messages (the grid's run counts) on stdout."""
    package = logging.getLogger("fedtune_core")
    if not any(isinstance(h, _Print) for h in package.handlers):
        package.addHandler(_Print())
    package.setLevel(logging.INFO)
    package.propagate = False  # open_clip's logging.info() gives the root logger a handler too


def cmd_index(args) -> int:
    from fedtune_core.study import index_page, report

    profile = load_profile(args.profile)
    folder = default_results(profile, args.results)
    by_experiment = {name: collect(profile, folder, name) for name in profile.experiments}
    print(index_page.write_index(folder, profile, report.findings(profile, by_experiment),
                             absent(profile, folder)))
    return 0


def _jobs(text: str) -> int:
    """``--jobs``: a whole number from 0 (automatic) to 256."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 256:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 (automatic) to 256, "
                                         f"got {text!r}")
    return value


def add_parser(sub) -> None:
    """Attach ``fedtune grid`` to the CLI's sub-parsers."""
    p = sub.add_parser("grid", help="run (or --dry-run: count) every run a profile needs")
    p.add_argument("--profile", default="demo", help=f"one of {', '.join(profiles())}, or a path")
    p.add_argument("--experiment", default=None, choices=EXPERIMENTS, help="only this one")
    p.add_argument("--results", default=None, help="results folder (default results/<profile>)")
    p.add_argument("--dry-run", action="store_true", help="list runs needed, cached, to run")
    p.add_argument("--force", action="store_true", help="recompute cached runs")
    p.add_argument("--retry-failed", action="store_true",
                   help="run diverged runs again too (other failed runs always are)")
    p.add_argument("--jobs", type=_jobs, default=0,
                   help="pool: runs in parallel processes (default 0: one per GPU, or one per "
                        "core on CPU); ray: CPUs of a local Ray instance (default: all)")
    p.add_argument("--backend", default="pool", choices=("pool", "ray"),
                   help="where runs execute: local processes (pool) or Ray (pip install -e "
                        "'.[ray]')")
    p.add_argument("--address", default=None,
                   help="ray: address of a running Ray cluster (auto, HOST:PORT); default: "
                        "start a local instance")
    p.add_argument("--gpus-per-run", type=float, default=None,
                   help="ray on CUDA: GPU share per run, e.g. 0.5 (default: the profile's, 1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda ...")
    p.add_argument("--data-dir", default=None, help="dataset folder ($FEDTUNE_DATA_DIR, ./data)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--rehearse", action="store_true",
                   help="every run shape once, tiny, at full size, into results/<profile>-"
                        "rehearsal: status, s/step, peak memory, projected cost")
    p.add_argument("--rehearse-batch", type=int, default=None,
                   help="--rehearse: batch size (default: the profile's on a GPU, 2 on CPU)")
    p.set_defaults(func=cmd_grid)

    p = sub.add_parser("index", help="write <results>/index.html: findings and links")
    p.add_argument("--profile", default="demo", help=f"one of {', '.join(profiles())}, or a path")
    p.add_argument("--results", default=None, help="results folder (default results/<profile>)")
    p.set_defaults(func=cmd_index)

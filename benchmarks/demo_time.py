"""Wall time of the default study from a truly cold start, by phase, for any commit.

    .venv/bin/python benchmarks/demo_time.py --rev 28df9b2 --rev fast   # back to back
    .venv/bin/python benchmarks/demo_time.py --log results/demo/logs/run_all.timed.log
    .venv/bin/python benchmarks/demo_time.py --profile-step             # one demo run's steps

For each ``--rev``: a fresh ``git clone`` of this repository into a temporary folder, that
commit checked out, no ``.venv``, no ``results/``, an empty ``FEDTUNE_CACHE_DIR`` and (unless
``--warm-uv``) an empty ``UV_CACHE_DIR`` (a newcomer has never used uv; pip's own cache is
left as it is), then ``./run_all.sh``. Every output line (tqdm's carriage-return updates
too) is timestamped into ``run_all.timed.log`` in that folder, and the phases are read
from it: install (until run_all.sh's first line), pre-training (the glyph corpus and the
checkpoints: their bars, or the ``pre-training:`` lines of newer commits), the
learning-rate sweeps, the runs, the notebooks and the index. Each checkpoint's own seconds
come from its sidecar (``seconds``: training and probe, in its own process). Load average
and the machine are printed beside the figures: on a shared machine, compare revisions
measured back to back, never absolute times.

Where the machine allows (Linux's ``/proc/stat``), each cold start also prints the whole
machine's busy and idle CPU-seconds while it ran, and the work done inside the workers:
the runs' and the sweep runs' own seconds (their records' ``wall_seconds``) and the
checkpoints'. That work over the cores is the floor of the grid's wall time at this work
per run: when the grid is close to it, only less work per run (or less work) makes the study
faster, not better scheduling. ``--log LOG --results DIR`` prints a kept run's phases and
its runs' work (no CPU-seconds, which only a cold start measures, and no checkpoints).

``--profile-step`` times one demo run here (clip-tiny, bias, the demo's FedAvg settings,
the strong checkpoint, built into ``$FEDTUNE_CACHE_DIR`` if missing; ``--weights none``
skips it) in this checkout: its set-up, training and evaluation seconds, then the torch
operators of a training step, in milliseconds per step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # tqdm's cursor moves between parallel bars


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.processor())
    return f"{platform.node()}, {os.cpu_count()} cores, {cpu}"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------- a cold start


def cold_start(rev: str, keep: bool, warm_uv: bool, args: list[str]) -> dict:
    """Clone ``rev`` into a temporary folder, run ./run_all.sh there cold, time its phases."""
    work = Path(tempfile.mkdtemp(prefix=f"demo-time-{re.sub(r'[^0-9A-Za-z]', '_', rev)}-"))
    src, cache = work / "src", work / "cache"
    cache.mkdir()
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(src)], check=True)
    subprocess.run(["git", "-C", str(src), "checkout", "--quiet", rev], check=True)
    commit = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
                            check=True, capture_output=True, text=True).stdout.strip()
    env = os.environ | {"FEDTUNE_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    if not warm_uv:
        (work / "uv-cache").mkdir()
        env["UV_CACHE_DIR"] = str(work / "uv-cache")
    log = work / "run_all.timed.log"
    print(f"== {rev} ({commit}) in {src}; load average {load()} at the start", flush=True)
    cpu0, t0 = cpu_seconds(), time.time()
    with log.open("w") as out:
        proc = subprocess.Popen(["./run_all.sh", *args], cwd=src, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for seconds, text in _segments(proc.stdout, t0):
            out.write(f"{seconds:9.2f} {text}\n")
            out.flush()  # the log can be followed while it runs (the stamps are taken on reading)
        code = proc.wait()
    wall, cpu1 = time.time() - t0, cpu_seconds()
    phases = parse(log.read_text())
    sidecars = sorted((cache / "pretrained").glob("*.json"))
    result = {"rev": rev, "commit": commit, "exit": code, "wall": wall, "phases": phases,
              "checkpoints": {f"{m['model']} {m['recipe']}": m["seconds"]
                              for m in map(lambda p: json.loads(p.read_text()), sidecars)},
              "load_end": load(), "log": str(log), "work": worker_seconds(src / "results"),
              "cpu": None if cpu0 is None or cpu1 is None else
              tuple(b - a for a, b in zip(cpu0, cpu1, strict=True))}
    if not keep:
        subprocess.run(["rm", "-rf", str(src / ".venv"), str(work / "uv-cache"),
                        str(cache)], check=False)
    return result


def cpu_seconds(stat: str | None = None) -> tuple[float, float] | None:
    """(busy, idle) CPU-seconds of the whole machine since boot, from ``/proc/stat``'s
    ``cpu`` line (``stat``: its text, for tests); None where there is none. Idle counts
    iowait; busy is user, nice, system, irq, softirq and steal."""
    try:
        text = stat if stat is not None else Path("/proc/stat").read_text()
        fields = next(line.split() for line in text.splitlines() if line.split()[:1] == ["cpu"])
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, fields[1:9])
    except (OSError, StopIteration, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")  # a /proc/stat means Linux, which has it
    return (user + nice + system + irq + softirq + steal) / hz, (idle + iowait) / hz


def worker_seconds(results: Path) -> dict[str, tuple[int, float]]:
    """``{"runs": (count, seconds), "sweep runs": (count, seconds)}``: the records under
    ``results/*/runs/`` and their own ``wall_seconds`` (a sweep run holds out validation
    data: ``config.val_fraction`` > 0). Files that are not such records are skipped, and so
    are seconds or fractions that are not finite numbers (the project's one number check,
    :func:`fedtune_core.errors.is_number`: torch-free, so this runs before any venv)."""
    if str(ROOT) not in sys.path:  # python3 from a bare clone: fedtune is not installed
        sys.path.insert(0, str(ROOT))
    from fedtune_core.errors import is_number

    out = {"runs": [0, 0.0], "sweep runs": [0, 0.0]}
    for path in sorted(Path(results).glob("*/runs/*.json")):
        try:
            record = json.loads(path.read_text())
            seconds, fraction = record["wall_seconds"], record["config"].get("val_fraction", 0)
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            continue
        if is_number(seconds) and seconds >= 0 and (fraction is None or is_number(fraction)):
            entry = out["sweep runs" if fraction else "runs"]
            entry[0] += 1
            entry[1] += seconds
    return {k: (n, s) for k, (n, s) in out.items()}


def _segments(stream, t0: float):
    """(seconds since t0, text) for every line or carriage-return update of ``stream``."""
    buf = b""
    while chunk := stream.read1(65536):
        buf += chunk
        *done, buf = re.split(rb"[\r\n]", buf)
        now = time.time() - t0
        for piece in done:
            if piece.strip():
                yield now, piece.decode(errors="replace").rstrip()
    if buf.strip():
        yield time.time() - t0, buf.decode(errors="replace").rstrip()


def parse(timed: str) -> dict[str, float]:
    """Phase -> seconds, from a timestamped log (``SECONDS TEXT`` per line)."""
    lines = []
    for raw in timed.splitlines():
        stamp, _, text = ANSI.sub("", raw).strip().partition(" ")
        text = text.strip()
        try:
            lines.append((float(stamp), text))
        except ValueError:
            continue
    if not lines:
        return {}

    def first(pattern: str, after: float = -1.0) -> float | None:
        rx = re.compile(pattern)
        return next((t for t, x in lines if t >= after and rx.search(x)), None)

    def last(pattern: str) -> float | None:
        rx = re.compile(pattern)
        return next((t for t, x in reversed(lines) if rx.search(x)), None)

    end = lines[-1][0]
    start = first(r"^== fedtune run_all") or 0.0
    runs_at = first(r"^== 1/3 runs") or start
    pre_from = first(r"glyph corpus|^pre-training: \d+ checkpoints|pretrain \S+ \d+ steps",
                     runs_at)
    sweeps_label = first(r"/lr sweeps: \d+ runs", runs_at)
    main_label = first(r"/all: \d+ runs", runs_at)
    pre_to = first(r"^pre-training: done", runs_at) if pre_from is not None else None
    if pre_from is not None and pre_to is None:  # older commits: the first run after the bars
        bars_end = last(r"glyph corpus|pretrain \S+ \d+ steps")
        pre_to = first(r"^runs:|\bruns:\s", bars_end or pre_from) or bars_end
    notebooks = first(r"^== 2/3 notebooks")
    index = first(r"^== 3/3 index")
    done = first(r"^== done") or end
    out = {"install": start}
    corpus_from, corpus_to = first(r"glyph corpus"), last(r"glyph corpus")
    if corpus_from is not None:
        out["glyph corpus"] = corpus_to - corpus_from
    if pre_from is not None:
        out["pre-training (corpus and checkpoints)"] = pre_to - pre_from
    sweeps_from = pre_to if pre_to is not None else sweeps_label
    if sweeps_from is not None and main_label is not None:
        out["learning-rate sweeps"] = main_label - sweeps_from
    if main_label is not None and notebooks is not None:
        out["runs"] = notebooks - main_label
    if notebooks is not None and index is not None:
        out["notebooks"] = index - notebooks
    if index is not None:
        out["index"] = done - index
    out["total"] = end
    return out


def report(result: dict) -> None:
    wall = f"wall {_mmss(result['wall'])}; " if result["wall"] else ""
    print(f"-- {result['rev']} ({result['commit']}): exit {result['exit']}, {wall}"
          f"load average at the end {result['load_end']}")
    for name, seconds in result["phases"].items():
        print(f"   {name:<40}{_mmss(seconds):>10}")
    for name, seconds in result["checkpoints"].items():
        print(f"   checkpoint {name:<29}{seconds:>8.0f} s  (its own process, probe included)")
    for line in accounting(result, os.cpu_count() or 1):
        print(f"   {line}")
    print(f"   log: {result['log']}", flush=True)


def accounting(result: dict, cores: int) -> list[str]:
    """Lines on the CPU: the machine's busy and idle CPU-seconds during the cold start, the
    work inside the workers, and that work over ``cores``: the grid's floor."""
    lines = []
    if result.get("cpu"):
        busy, idle = result["cpu"]
        lines.append(f"CPU while it ran: {busy:.0f} CPU-s busy, {idle:.0f} idle "
                     f"({100 * idle / max(busy + idle, 1e-9):.1f}% idle, {cores} cores)")
    done = {k: v for k, v in (result.get("work") or {}).items() if v[0]}
    checkpoints = sum(result.get("checkpoints", {}).values())
    if done or checkpoints:
        parts = [f"{n} {name} {s:.0f} s" for name, (n, s) in done.items()]
        if checkpoints:
            parts.append(f"{len(result['checkpoints'])} checkpoints {checkpoints:.0f} s")
        total = checkpoints + sum(s for _, s in done.values())
        lines.append(f"work inside the workers: {', '.join(parts)}; {total:.0f} CPU-s, "
                     f"{_mmss(total / cores)} over {cores} cores (the grid's floor at this "
                     "work per run)")
    return lines


def _mmss(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:4.1f} s"


# ------------------------------------------------------------ one run's steps


def profile_step(weights: str, top: int) -> None:
    """One demo run: set-up, training and evaluation seconds (timed without the profiler),
    then the torch operators of the same run under torch.profiler, per training step."""
    from torch.profiler import ProfilerActivity, profile

    from fedtune_core.config import RunConfig
    from fedtune_core.fl import builtin, features, inputs, training
    from fedtune_core.proxy import pretrain

    threads = training.set_cpu_threads()
    cfg = RunConfig(model="clip-tiny", weights=weights, method="bias", dataset="digits",
                    partition="dirichlet:0.5", clients=10, sample=5, rounds=10, batch_size=32,
                    optimizer="adamw", lr=3e-3, seed=0)
    path = pretrain.weights_file(cfg.model, cfg.weights, progress=True)  # built if missing

    def execute(c):
        return builtin.execute(c, device="cpu", weights_file=path)

    execute(cfg)  # warm-up: imports, the checkpoint, the dataset
    wrapped = {"training": (training.Trainer, "train_on"),
               "evaluation": (training.Trainer, "evaluate"),
               "preprocessing once": (inputs, "preprocess"),
               "encoder features once": (features, "encode")}
    spent = dict.fromkeys(wrapped, 0.0)
    originals = {name: getattr(owner, attr) for name, (owner, attr) in wrapped.items()}

    def timed(name, fn):
        def inner(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t0
        return inner

    for name, fn in originals.items():
        setattr(wrapped[name][0], wrapped[name][1], timed(name, fn))
    t0 = time.perf_counter()
    execute(cfg.replace(seed=1))
    wall = time.perf_counter() - t0
    for name, fn in originals.items():
        setattr(wrapped[name][0], wrapped[name][1], fn)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        execute(cfg.replace(seed=1))
    events = prof.key_averages()
    n = max(1, sum(e.count for e in events if e.key.startswith("Optimizer.step#")))
    print(f"one demo run (clip-tiny bias, weights {weights}, 10 clients, 5 a round, 10 rounds, "
          f"batch 32, AdamW), {threads} thread(s); load average {load()}; {machine()}")
    rest = wall - spent["training"] - spent["evaluation"] - spent["encoder features once"]
    print(f"   run {wall:.2f} s: training {spent['training']:.2f} s ({n} steps, "
          f"{1e3 * spent['training'] / n:.1f} ms a step), evaluation "
          f"{spent['evaluation']:.2f} s, set-up, averaging and the rest {rest:.2f} s "
          f"(preprocessing once {spent['preprocessing once']:.2f} s)")
    print(f"   operators by self CPU time under torch.profiler (inflates small ops), ms per "
          f"training step ({n} steps; evaluation and set-up included):")
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]:
        per_step = e.self_cpu_time_total / 1e3 / n
        print(f"   {e.key[:60]:<62}{per_step:>8.2f}{e.count / n:>8.1f} calls")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rev", action="append", default=[],
                   help="a commit, branch or tag to time from a cold start (repeatable)")
    p.add_argument("--keep", action="store_true",
                   help="keep each clone's .venv, uv cache and FEDTUNE cache")
    p.add_argument("--warm-uv", action="store_true", help="use the usual uv cache")
    p.add_argument("--log", help="only print the phases of a timestamped log")
    p.add_argument("--results", help="--log: the results folder of that run (its records' "
                   "seconds)")
    p.add_argument("--profile-step", action="store_true", help="one demo run's steps, here")
    p.add_argument("--weights", default="glyphs-strong", help="--profile-step: the weights")
    p.add_argument("--top", type=int, default=15, help="--profile-step: operators shown")
    p.add_argument("run_all_args", nargs="*", help="after --: arguments for run_all.sh")
    args = p.parse_args()
    if args.top < 1:
        print(f"demo_time.py: --top must be at least 1, got {args.top}", file=sys.stderr)
        return 2
    if args.results and not args.log:
        print("demo_time.py: --results goes with --log LOG", file=sys.stderr)
        return 2
    for given in filter(None, (args.log, args.results)):
        if not Path(given).exists():
            print(f"demo_time.py: no such file or folder {given!r}", file=sys.stderr)
            return 2
    print(f"{machine()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"load average {load()}")
    if args.log:
        report({"rev": args.log, "commit": "-", "exit": "-", "wall": 0.0, "load_end": load(),
                "phases": parse(Path(args.log).read_text()), "checkpoints": {},
                "log": args.log,
                "work": worker_seconds(Path(args.results)) if args.results else {}})
    if args.profile_step:
        profile_step(args.weights, args.top)
    results = [cold_start(rev, args.keep, args.warm_uv, args.run_all_args) for rev in args.rev]
    for result in results:
        report(result)
    if len(results) > 1:
        base = results[0]
        for other in results[1:]:
            print(f"{other['rev']} / {base['rev']}: {other['wall'] / base['wall']:.2f} of the "
                  "wall time")
    if not (args.rev or args.log or args.profile_step):
        p.print_usage()
    return 1 if any(r["exit"] != 0 for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

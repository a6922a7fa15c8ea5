"""benchmarks/demo_time.py's CPU accounting: the machine's busy and idle CPU-seconds, the
work inside the workers read from run records, and the floor it gives (issue 18, part 2).

The timings themselves are never asserted (tests do not race the clock); these tests check
that the figures the benchmark prints are read correctly from what is on disk."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "demo_time.py"


@pytest.fixture(scope="module")
def demo_time():
    spec = importlib.util.spec_from_file_location("demo_time", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_seconds_reads_the_cpu_line(demo_time):
    hz = os.sysconf("SC_CLK_TCK")
    stat = ("cpu  100 20 30 400 50 6 7 8 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\nintr 1 2\n")
    busy, idle = demo_time.cpu_seconds(stat)
    assert busy == pytest.approx((100 + 20 + 30 + 6 + 7 + 8) / hz)  # steal counts as busy
    assert idle == pytest.approx((400 + 50) / hz)  # iowait counts as idle
    for broken in ("", "intr 1 2\n", "cpu  1 2 x 4 5 6 7 8\n", "cpu 1 2 3\n"):
        assert demo_time.cpu_seconds(broken) is None


def _record(folder: Path, name: str, seconds, val_fraction=0.0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(
        {"wall_seconds": seconds, "config": {"val_fraction": val_fraction}}))


def test_work_sums_runs_and_sweeps_and_skips_what_is_not_a_record(demo_time, tmp_path):
    runs = tmp_path / "demo" / "runs"
    _record(runs, "a", 2.5)
    _record(runs, "b", 1.5)
    _record(runs, "c", 1.0, val_fraction=0.2)
    _record(tmp_path / "smoke" / "runs", "d", 4.0)  # another profile's records count too
    _record(runs, "negative", -3.0)
    _record(runs, "text", "soon")
    (runs / "torn.json").write_text('{"wall_seconds": 1.')
    (runs / "list.json").write_text("[1, 2]")
    (runs / "no-config.json").write_text('{"wall_seconds": 9}')
    _record(runs, "as-text", "2.5")  # a number written as text is not a number
    _record(runs, "bool", True)
    (runs / "infinite.json").write_text('{"wall_seconds": Infinity, "config": {}}')
    _record(runs, "odd-fraction", 2.0, val_fraction="0.2")
    (runs / "notes.txt").write_text("not a record")
    (tmp_path / "demo" / "stray.json").write_text('{"wall_seconds": 9, "config": {}}')
    assert demo_time.worker_seconds(tmp_path) == {"runs": (3, 8.0), "sweep runs": (1, 1.0)}
    empty = {"runs": (0, 0.0), "sweep runs": (0, 0.0)}
    assert demo_time.worker_seconds(tmp_path / "absent") == empty


def test_accounting_gives_the_floor_over_the_cores(demo_time):
    result = {"cpu": (180.0, 20.0), "work": {"runs": (4, 100.0), "sweep runs": (0, 0.0)},
              "checkpoints": {"clip-tiny glyphs-strong": 50.0, "vit-tiny glyphs-strong": 30.0}}
    lines = demo_time.accounting(result, 2)
    assert lines[0] == "CPU while it ran: 180 CPU-s busy, 20 idle (10.0% idle, 2 cores)"
    assert lines[1].startswith("work inside the workers: 4 runs 100 s, 2 checkpoints 80 s; "
                               "180 CPU-s, 1 min 30.0 s over 2 cores")
    assert "sweep runs" not in lines[1]  # none were run
    assert demo_time.accounting({"cpu": None, "work": {}, "checkpoints": {}}, 2) == []


@pytest.mark.parametrize("args, says", [
    (["--results", "x"], "--results goes with --log LOG"),
    (["--log", "no-such.log"], "no such file or folder 'no-such.log'"),
    (["--top", "0"], "--top must be at least 1, got 0"),
])
def test_bad_arguments_get_one_line_and_exit_2(args, says, tmp_path):
    done = subprocess.run([sys.executable, str(BENCH), *args], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == f"demo_time.py: {says}"
    assert done.stdout == ""  # nothing printed before the refusal


def test_log_with_results_prints_the_work(tmp_path):
    log = tmp_path / "run_all.timed.log"
    log.write_text("    1.00 == fedtune run_all: profile demo\n    1.10 == 1/3 runs\n"
                   "    2.00 demo/all: 1 runs, 0 cached, 1 to run\n"
                   "    5.00 == 2/3 notebooks\n    6.00 == 3/3 index\n    6.50 == done: open\n")
    _record(tmp_path / "results" / "demo" / "runs", "a", 3.0)
    done = subprocess.run([sys.executable, str(BENCH), "--log", str(log), "--results",
                           str(tmp_path / "results")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "work inside the workers: 1 runs 3 s; 3 CPU-s" in done.stdout
    assert "runs                                    0 min  3.0 s" in done.stdout

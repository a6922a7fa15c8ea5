"""Execution backends: the local pool and Ray give the same records, survive a dead worker,
and a driver killed with -9 loses nothing. One local Ray instance serves every Ray test."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedtune_core.cli import main
from fedtune_core.errors import ConfigError
from fedtune_core.runs import backends, pool
from fedtune_core.study import grid

FEDTUNE = str(Path(sys.executable).with_name("fedtune"))
METRICS = ("test_acc", "test_loss", "train_loss", "bytes_up", "bytes_down")
PROFILE = """\
description = "backend tests"
pretrained = false
seeds = {seeds}
[base]
dataset = "digits"
weights = "none"
partition = "iid"
clients = 2
sample = 2
rounds = 1
batch_size = 64
optimizer = "adamw"
[variants]
head = {{ method = "head" }}
bias = {{ method = "bias" }}
[[tuning_methods]]
model = ["clip-tiny", "vit-tiny"]
variant = ["head", "bias"]
"""


def _profile(folder: Path, seeds: list[int]) -> Path:
    path = folder / "tiny.toml"
    path.write_text(PROFILE.format(seeds=seeds))
    return path


@pytest.fixture(scope="module")
def ray_instance(start_local_ray):
    """One local Ray instance (2 CPUs) for the module; its address for other drivers."""
    ray = pytest.importorskip("ray")
    yield start_local_ray()
    ray.shutdown()


def _dies_on(victim: str, real):
    """``real``, but the process that runs the config hashed ``victim`` kills itself with
    SIGKILL (an out-of-memory kill or a segfault). A closure: Ray pickles it by value."""

    def call(cfg, *args):
        if cfg.hash == victim:
            signal.raise_signal(signal.SIGKILL)
        return real(cfg, *args)

    return call


@pytest.fixture(scope="module")
def killed_grids(tmp_path_factory, ray_instance):
    """The 4-run profile on each backend, the worker of its second run killed with SIGKILL."""
    folder = tmp_path_factory.mktemp("grids")
    profile = grid.load_profile(_profile(folder, [0]))
    victim = profile.runs()[1]
    with pytest.MonkeyPatch.context() as mp:  # the pool's forked workers inherit the patch
        mp.setattr(pool, "work", _dies_on(victim.hash, pool.work))
        mp.setattr(backends, "_ray_task", _dies_on(victim.hash, backends._ray_task))
        out = {backend: grid.ensure(profile, folder / backend, jobs=2, progress=False,
                                    backend=backend, device="cpu")
               for backend in backends.BACKENDS}
    return profile, victim, folder, out


@pytest.mark.slow
@pytest.mark.parametrize("backend", backends.BACKENDS)
def test_a_worker_killed_with_sigkill_is_recorded_failed_and_the_rest_completes(
        killed_grids, backend):
    profile, victim, folder, out = killed_grids
    records = {r["hash"]: r for r in out[backend]}
    assert set(records) == {c.hash for c in profile.runs()}
    dead = records.pop(victim.hash)
    assert dead["status"] == "failed" and dead["rounds"] == []
    if backend == "pool":
        assert "killed by SIGKILL" in dead["error"]
    else:
        assert dead["error"].startswith("WorkerCrashedError") and "died" in dead["error"]
    assert all(r["status"] == "ok" and len(r["rounds"]) == 2 for r in records.values())
    on_disk = json.loads((folder / backend / "runs" / f"{victim.hash}.json").read_text())
    assert on_disk == json.loads(json.dumps(dead))

    again = grid.ensure(profile, folder / backend, progress=False, backend=backend,
                        device="cpu", jobs=2)  # without the hook: only the failed run reruns
    assert all(r["status"] == "ok" for r in again)
    assert {r["hash"]: r["started"] for r in again if r["hash"] != victim.hash} == {
        h: r["started"] for h, r in records.items()}


@pytest.mark.slow
def test_ray_and_the_pool_give_the_same_metrics(killed_grids):
    profile, victim, _, out = killed_grids
    by = {b: {r["hash"]: r for r in recs} for b, recs in out.items()}
    ok = [c.hash for c in profile.runs() if c.hash != victim.hash]
    for h in ok:
        pool, ray = by["pool"][h], by["ray"][h]
        assert pool["final"] == ray["final"] and pool["params"] == ray["params"]
        assert [[r[k] for k in METRICS] for r in pool["rounds"]] == [
            [r[k] for k in METRICS] for r in ray["rounds"]]


def _records(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (folder / "runs").glob("*.json")}


@pytest.mark.slow
def test_a_ray_driver_killed_with_sigkill_loses_nothing_and_the_next_call_resumes(
        tmp_path, ray_instance, capsys, paused_cli):
    profile_path = _profile(tmp_path, [0, 1])
    profile = grid.load_profile(profile_path)
    total = len(profile.runs())
    out = tmp_path / "res"
    argv = ["grid", "--profile", str(profile_path), "--results", str(out), "--quiet",
            "--backend", "ray", "--address", ray_instance, "--device", "cpu"]
    proc = paused_cli(argv, after=2)  # stopped after its second record, tasks in flight
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = _records(out)
    assert 2 <= len(finished) < total, "the kill should land mid-grid"
    for path in (out / "runs").glob("*.json"):
        assert json.loads(path.read_text())["status"] == "ok"  # no half-written record
    capsys.readouterr()
    # the next call resumes (in this process, on the Ray instance of the module)
    assert main(["grid", "--profile", str(profile_path), "--results", str(out), "--quiet",
                 "--backend", "ray", "--device", "cpu"]) == 0
    assert f"{len(finished)} cached, {total - len(finished)} to run" in capsys.readouterr().out
    after = _records(out)
    assert len(after) == total
    assert {k: after[k] for k in finished} == finished  # finished runs were not redone


@pytest.mark.parametrize("argv, needle", [
    (["--address", "auto"], "--address 'auto' is for the ray backend"),
    (["--backend", "ray", "--device", "cuda:1"], "unknown device 'cuda:1' for the ray backend"),
    (["--gpus-per-run", "1.5"], "gpus per run must be > 0 and <= 1, got 1.5"),
])
def test_bad_backend_input_exits_2_with_one_line_and_writes_nothing(argv, needle, tmp_path,
                                                                     capsys):
    out = tmp_path / "res"
    assert main(["grid", "--profile", "smoke", "--results", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_the_ray_backend_without_ray_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[ray\]'"):
        backends.run("ray", [], backends.Placement())


def test_a_bad_gpus_per_run_in_a_profile_fails_at_load(tmp_path):
    path = _profile(tmp_path, [0])
    path.write_text("gpus_per_run = 2\n" + path.read_text())
    with pytest.raises(ConfigError, match=r"tiny.toml: gpus_per_run must be a number > 0 "
                                          r"and <= 1 .*, got 2"):
        grid.load_profile(path)


@pytest.mark.slow
def test_the_pool_skips_a_run_another_process_holds_then_waits_for_it(tmp_path, capfd,
                                                                      monkeypatch):
    from fedtune_core import lock
    from fedtune_core.runs import store

    profile = grid.load_profile(_profile(tmp_path, [0]))
    held = profile.runs()[0]
    out = tmp_path / "res"
    # holds the lock until told (a line on its stdin): once the grid waits for it
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom fedtune_core.runs import store\n"
         "with store.run_lock(sys.argv[1]) as lock:\n    print(lock.held, flush=True)\n"
         "    sys.stdin.readline()",
         str(store.record_path(out, held))], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)
    assert holder.stdout.readline().strip() == "True"
    waited, wait_flock = [], lock.wait_flock

    def release_then_wait(fd, what, owner):  # the grid now waits: the holder lets go
        waited.append(len(list((out / "runs").glob("*.json"))))
        holder.stdin.write("go\n")
        holder.stdin.flush()
        wait_flock(fd, what, owner)

    monkeypatch.setattr(lock, "wait_flock", release_then_wait)
    try:
        records = grid.ensure(profile, out, jobs=2, progress=False, device="cpu")
    finally:
        holder.kill()
        holder.wait()
    assert waited == [3], "skipped at first, waited for once the other three were written"
    assert len(records) == 4 and all(r["status"] == "ok" for r in records)
    assert f"run {held.hash} is being computed by pid {holder.pid}" in capfd.readouterr().err
    assert not list((out / "runs").glob("*.lock"))
    assert store.clean_stale(out / "runs") == 0

"""The run store under stress: kills during record writes, locks between processes, stale
temp files, file modes; and the fast paths: no torch before arguments are checked, the hub
and CIFAR failing fast offline, a closed pipe."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedtune_core import files, lock
from fedtune_core.config import RunConfig
from fedtune_core.errors import ConfigError
from fedtune_core.fl import builtin
from fedtune_core.runs import claims, store

# the smallest run that still does everything: 2 clients, 1 round, tiny ViT on digits
ONE_ROUND = dict(model="vit-tiny", weights="none", method="bias", dataset="digits",
                 partition="iid", clients=2, sample=2, rounds=1, local_epochs=1, batch_size=64)

FEDTUNE = str(Path(sys.executable).with_name("fedtune"))


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> tuple[RunConfig, dict]:
    cfg = RunConfig(**ONE_ROUND)
    return cfg, claims.run(cfg, tmp_path_factory.mktemp("valid"))


def _python(code: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


# ---------------------------------------------------------------- kill -9 during record writes

WRITER = """
import json, os, time
from fedtune_core.runs import records as results
from fedtune_core.runs import claims
from fedtune_core.runs import store
path, record, slow = {path!r}, json.load(open({source!r})), {slow}
record["rounds"] = record["rounds"] * 3000  # a few MB: writes take a while
if slow:  # a disk that stalls in fsync: the temp file is complete but not yet renamed
    def stall(fd):
        print("in fsync", flush=True)
        time.sleep(60)
    os.fsync = stall
print("ready", flush=True)
while True:
    store.write_json(path, record)
"""


def test_kill_during_record_writes_leaves_no_half_record_and_the_next_call_cleans(
        tmp_path, valid):
    cfg, record = valid
    folder = tmp_path / "res"
    path = store.record_path(folder, cfg)
    source = tmp_path / "record.json"
    source.write_text(json.dumps(record))
    rng = random.Random(0)
    left = 0
    for attempt in range(6):
        slow = attempt == 0
        proc = _python(WRITER.format(path=str(path), source=str(source), slow=slow))
        assert proc.stdout.readline().strip() == "ready"
        if slow:
            assert proc.stdout.readline().strip() == "in fsync"
        else:
            time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        temps = list(path.parent.glob(".*.tmp"))
        left += len(temps)
        if path.exists():  # whatever was renamed into place is a whole record
            assert store.read_record(path, warn=False)["hash"] == cfg.hash
        assert store.clean_stale(path.parent) == len(temps)
        assert list(path.parent.glob(".*.tmp")) == []
    assert left >= 1, "the stalled writer must have left its temp file"
    # a run call (here a cache hit) cleans up as well: a dead writer's file, and an old one
    dead = path.parent / f".{path.name}.{files.host()}.999999999.abcd1234.tmp"
    dead.write_text("{")
    old = path.parent / f".{path.name}.abcd1234.tmp"
    old.write_text("{")
    os.utime(old, (time.time() - 2 * files.STALE_SECONDS,) * 2)
    store.write_json(path, record)
    assert claims.run(cfg, folder) == record
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_records_are_readable_by_the_group(tmp_path, valid):
    cfg, record = valid
    old = os.umask(0o022)
    try:
        store.write_json(tmp_path / "r.json", record)
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------- locks between processes

HOLDER = """
import json, sys, time
from fedtune_core.runs import records as results, store
from fedtune_core.runs import claims
from fedtune_core.runs import store
path = {path!r}
with store.run_lock(path) as lock:
    print("locked", flush=True)
    sys.stdin.readline()  # held until the test says so
    if {write}:
        store.write_json(path, json.load(open({source!r})))
print("released", flush=True)
time.sleep(60)
"""


def _holder(path: Path, source: Path, write: bool) -> subprocess.Popen:
    proc = _python(HOLDER.format(path=str(path), source=str(source), write=write),
                   stdin=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _release_once_waited_for(holder: subprocess.Popen, monkeypatch) -> None:
    """When this process starts waiting for a lock, ``holder`` is told to let go of it."""
    wait_flock = lock.wait_flock

    def release_then_wait(fd, what, owner):
        holder.stdin.write("go\n")
        holder.stdin.flush()
        wait_flock(fd, what, owner)

    monkeypatch.setattr(lock, "wait_flock", release_then_wait)


def _forbid(*args, **kwargs):
    raise AssertionError("this run must not be computed here")


def test_a_run_locked_by_a_live_process_is_waited_for_and_its_record_used(
        tmp_path, valid, monkeypatch, capsys):
    cfg, record = valid
    path = store.record_path(tmp_path, cfg)
    source = tmp_path / "record.json"
    source.write_text(json.dumps(record))
    proc = _holder(path, source, write=True)
    try:
        assert claims.run(cfg, tmp_path, wait=False) is None  # busy: skipped
        monkeypatch.setattr(builtin, "execute", _forbid)
        _release_once_waited_for(proc, monkeypatch)
        assert claims.run(cfg, tmp_path) == record  # waited, then read its record
        err = capsys.readouterr().err
        assert f"run {cfg.hash} is being computed by pid {proc.pid}" in err
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_of_a_killed_process_is_taken_over(tmp_path, valid):
    cfg, record = valid
    path = store.record_path(tmp_path, cfg)
    proc = _holder(path, tmp_path / "unused", write=False)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert path.with_suffix(".lock").read_text().split()[0] == str(proc.pid)  # left behind
    fresh = claims.run(cfg, tmp_path, wait=False)
    assert fresh is not None and fresh["status"] == "ok"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_a_refused_run_leaves_not_even_its_folders(tmp_path, monkeypatch):
    cfg = RunConfig(**(ONE_ROUND | {"partition": "shards:11"}))
    with pytest.raises(ConfigError, match="shards:11"):
        claims.run(cfg, tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- fast paths

def test_bad_arguments_are_answered_without_importing_torch(tmp_path):
    code = """
    import sys
    from fedtune_core import cli
    for argv in (["run", "--model", "nope"], ["run", "--lr", "nan"],
                 ["run", "--method", "adapter", "--adapter-scale", "nan"],
                 ["run", "--seed", str(2**64)], ["run", "--results", __file__ + "/x"],
                 ["params", "--model", "nope", "--classes", "3"],
                 ["grid", "--profile", "smoke", "--dry-run", "--results", "r"]):
        print(argv[:2], cli.main(argv), flush=True)
    heavy = sorted(m for m in ("torch", "timm", "open_clip", "peft", "sklearn") if m in sys.modules)
    print("heavy:", heavy)
    """
    (tmp_path / "f").write_text("a file")
    proc = _python(code.replace("__file__", repr(str(tmp_path / "f"))), cwd=tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.strip().splitlines()[-1] == "heavy: []", out
    assert [line.split()[-1] for line in out.strip().splitlines()[:6]] == ["2"] * 6, out
    assert len(err.strip().splitlines()) == 6, err


def test_dry_run_into_a_closed_pipe_ends_quietly(tmp_path):
    read, write = os.pipe()
    os.close(read)  # like `| head -1` that has already exited
    proc = subprocess.run([FEDTUNE, "grid", "--profile", "paper", "--dry-run", "--results",
                           str(tmp_path)], stdout=write, stderr=subprocess.PIPE, text=True,
                          timeout=120)
    os.close(write)
    assert proc.stderr == "" and proc.returncode == 141


def test_unreachable_hub_fails_at_once_with_one_line(tmp_path, monkeypatch, caplog):
    import huggingface_hub.constants as hub

    from fedtune_core.fl import models, weights

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("FEDTUNE_WEIGHTS_DIR", raising=False)
    for proxy in ("no_proxy", "NO_PROXY"):  # the probe goes to 127.0.0.1 itself
        monkeypatch.setenv(proxy, "*")
    weights.prepare_hub.cache_clear()
    try:
        with pytest.raises(ConfigError) as info:
            models.build("vit-b32", ["a", "b"], "auto", text_head=False)
        assert hub.HF_HUB_OFFLINE, "unreachable: offline mode for the rest of the process"
    finally:
        weights.prepare_hub.cache_clear()
    message = str(info.value)
    assert "\n" not in message
    for needle in ("vit-b32", "--weights", "FEDTUNE_WEIGHTS_DIR", "HF_HUB_OFFLINE=1"):
        assert needle in message
    assert "Retrying" not in caplog.text, "one probe, then the local cache: no retries"


def test_cifar_offline_leaves_no_empty_data_folder(tmp_path, monkeypatch):
    import urllib.error

    from torchvision.datasets import cifar

    from fedtune_core.fl import data

    def offline(url, download_root, *args, **kwargs):
        Path(download_root).mkdir(parents=True, exist_ok=True)
        Path(download_root, "cifar-10-python.tar.gz.part").write_bytes(b"half")
        raise urllib.error.URLError("no internet here")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    root = tmp_path / "data"
    with pytest.raises(ConfigError, match="could not load cifar10"):
        data.load("cifar10", root)
    assert not root.exists()
    root.mkdir()  # a folder the user made is left alone
    with pytest.raises(ConfigError):
        data.load("cifar10", root)
    assert root.is_dir()


def test_a_grid_skips_a_run_another_process_holds_then_uses_its_record(tmp_path, valid,
                                                                       monkeypatch, capsys):
    from fedtune_core.study import grid

    cfg, record = valid
    profile = tmp_path / "two.toml"
    settings = {k: v for k, v in ONE_ROUND.items() if k != "method"}
    profile.write_text("seeds = [0]\n[base]\n" + "".join(
        f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
        + '[[tuning_methods]]\nmethod = ["bias", "head"]\n')
    cfgs = grid.load_profile(profile).runs()
    assert cfg.hash in {c.hash for c in cfgs} and len(cfgs) == 2
    out = tmp_path / "res"
    source = tmp_path / "record.json"
    source.write_text(json.dumps(record))
    holder = _holder(store.record_path(out, cfg), source, write=True)
    _release_once_waited_for(holder, monkeypatch)
    computed = []
    real = builtin.execute
    monkeypatch.setattr(builtin, "execute", lambda c, **k: computed.append(c.hash) or real(c, **k))
    try:
        records = grid.ensure(grid.load_profile(profile), out, jobs=1, progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert computed == [c.hash for c in cfgs if c.hash != cfg.hash]
    assert {r["hash"] for r in records} == {c.hash for c in cfgs}
    assert all(r["status"] == "ok" for r in records)
    assert f"run {cfg.hash} is being computed by pid {holder.pid}" in capsys.readouterr().err

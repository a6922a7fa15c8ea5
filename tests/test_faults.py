"""Faults of the environment and the file system, and bounds (issue 19, parts 3 and 4).

Environment variables out of range, a cache folder that is a file, device names, a profile
that expands to too many runs, a lock held by a live process, names too long, odd
characters in paths, a disk that fills up mid-grid: one line, exit code 2, nothing
half-written; a full disk keeps every record already whole and the next call completes.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_bad_inputs import TINY, _files, _refused, _tiny_profile

from fedtune_core import cli, files, lock
from fedtune_core.errors import ConfigError
from fedtune_core.fl import builtin
from fedtune_core.runs import store
from fedtune_core.study.profile import load_profile

GRID_BASE = 'weights = "none"\npartition = "iid"\nclients = 2\nsample = 2\nbatch_size = 64'


def _forbidden(*args, **kwargs):
    raise AssertionError("nothing may be computed")


# ---------------------------------------------------------------- environment variables


@pytest.mark.parametrize("name, value, needles", [
    ("FEDTUNE_THREADS", "0", ["FEDTUNE_THREADS", "from 1 to 1024", "'0'"]),
    ("FEDTUNE_THREADS", "many", ["FEDTUNE_THREADS", "'many'"]),
    ("FEDTUNE_THREADS", "-2", ["FEDTUNE_THREADS", "'-2'"]),
    ("FEDTUNE_THREADS", "1.5", ["FEDTUNE_THREADS", "'1.5'"]),
    ("FEDTUNE_THREADS", "100000", ["FEDTUNE_THREADS", "'100000'"]),
    ("FEDTUNE_LOCK_WAIT", "soon", ["FEDTUNE_LOCK_WAIT", "forever", "'soon'"]),
    ("FEDTUNE_LOCK_WAIT", "-1", ["FEDTUNE_LOCK_WAIT", "'-1'"]),
    ("FEDTUNE_MAX_RUNS", "0", ["FEDTUNE_MAX_RUNS", "'0'"]),
])
@pytest.mark.parametrize("command", ["run", "grid"])
def test_environment_out_of_range_is_one_line(name, value, needles, command, run_cli, tmp_path,
                                              monkeypatch):
    monkeypatch.setattr(builtin, "execute", _forbidden)
    monkeypatch.setenv(name, value)
    out = tmp_path / "res"
    argv = (["run", *TINY] if command == "run" else
            ["grid", "--profile", _tiny_profile(tmp_path, GRID_BASE), "--jobs", "1", "--quiet"])
    _refused(*run_cli([*argv, "--results", out]), needles)
    assert _files(out) == []


@pytest.mark.parametrize("where", ["is a file", "under a file"])
def test_a_cache_folder_that_cannot_be_used_is_one_line_and_no_failed_record(
        where, run_cli, tmp_path, monkeypatch):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FEDTUNE_CACHE_DIR", str(blocker if where == "is a file"
                                                 else blocker / "cache"))
    out = tmp_path / "res"
    argv = list(TINY)
    argv[argv.index("--weights") + 1] = "glyphs-weak"
    _refused(*run_cli(["run", *argv, "--results", out]), ["cannot write", "FEDTUNE_CACHE_DIR"])
    assert _files(out) == [], "a machine fault is not the run's: no failed record"
    assert blocker.read_text() == "not a folder"


def test_a_read_only_cache_is_one_line_and_no_failed_record(run_cli, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("FEDTUNE_CACHE_DIR", str(cache_dir))

    class ReadOnly:  # os as the lock sees it, on a file system mounted read-only
        def __getattr__(self, name: str):
            return getattr(os, name)

        def open(self, path, *args, **kwargs):
            if str(path).startswith(str(cache_dir)):
                raise OSError(errno.EROFS, "Read-only file system")
            return os.open(path, *args, **kwargs)

    monkeypatch.setattr(lock, "os", ReadOnly())
    out = tmp_path / "res"
    argv = list(TINY)
    argv[argv.index("--weights") + 1] = "glyphs-weak"
    _refused(*run_cli(["run", *argv, "--results", out]),
             ["Read-only file system", "FEDTUNE_CACHE_DIR"])
    assert _files(out) == []


# ---------------------------------------------------------------- devices


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu0", "cpu:3", ""])
def test_an_unknown_device_is_one_line(device, run_cli, tmp_path):
    out = tmp_path / "res"
    _refused(*run_cli(["run", *TINY, "--device", device, "--results", out]),
             ["unknown or unavailable device", repr(device), "valid choices here: auto, cpu"])
    assert _files(out) == []


def test_devices_are_refused_without_importing_torch(tmp_path):
    code = ("import sys\nfrom fedtune_core import cli\n"
            "codes = [cli.main(['run', '--device', d, '--results', sys.argv[1]])\n"
            "         for d in ('tpu', 'cuda:7')]\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "print(codes)\n")
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}  # no GPU, whatever the machine
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "res")], env=env,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[2, 2]"
    assert done.stderr.count("fedtune: error: unknown or unavailable device") == 2


# ---------------------------------------------------------------- bounds


def _huge_profile(tmp_path: Path, lists: int, length: int = 100) -> Path:
    """A profile of ``lists`` axes of ``length`` values each (length ** lists runs)."""
    path = tmp_path / "huge.toml"
    axis = "[" + ", ".join(str(i) for i in range(1, length + 1)) + "]"
    fields = ["rounds", "local_epochs", "batch_size", "clients", "eval_every"][:lists]
    path.write_text('seeds = [0]\n[base]\nmodel = "vit-tiny"\nweights = "none"\n'
                    '[[tuning_methods]]\nmethod = "head"\n'
                    + "".join(f"{f} = {axis}\n" for f in fields))
    return path


@pytest.mark.parametrize("lists, count", [(3, "1,000,000"), (5, "10,000,000,000")])
@pytest.mark.parametrize("dry", [True, False])
def test_a_profile_that_expands_too_far_is_counted_and_refused(lists, count, dry, run_cli,
                                                                tmp_path):
    out = tmp_path / "res"
    argv = ["grid", "--profile", _huge_profile(tmp_path, lists), "--results", out, "--quiet"]
    _refused(*run_cli(argv + (["--dry-run"] if dry else [])),
             [f"expands to {count} runs", "cap of 20,000", "FEDTUNE_MAX_RUNS=N"])
    assert _files(out) == []


def test_the_cap_is_set_by_the_environment(tmp_path, monkeypatch):
    path = _huge_profile(tmp_path, 2, 8)  # 64 runs
    monkeypatch.setenv("FEDTUNE_MAX_RUNS", "63")
    with pytest.raises(ConfigError, match="expands to 64 runs, more than the cap of 63"):
        load_profile(path)
    monkeypatch.setenv("FEDTUNE_MAX_RUNS", "64")
    assert len(load_profile(path).planned()) == 64


def test_a_lock_held_by_a_live_process_ends_in_one_line(run_cli, tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "execute", _forbidden)
    monkeypatch.setenv("FEDTUNE_LOCK_WAIT", "0")
    out = tmp_path / "res"
    cfg = cli._config_from(cli.build_parser().parse_args(["run", *TINY]))
    record = store.record_path(out, cfg)
    ready = tmp_path / "ready"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, pathlib\nfrom fedtune_core.runs import store\n"
         "with store.run_lock(sys.argv[1]) as lock:\n"
         "    pathlib.Path(sys.argv[2]).write_text('held')\n"
         "    sys.stdin.read()\n", str(record), str(ready)],
        stdin=subprocess.PIPE, text=True)
    try:
        _wait_for(ready, holder)
        code, stdout, err = run_cli(["run", *TINY, "--results", out])
        line = _refused(code, stdout, err, ["still held by", f"pid {holder.pid}",
                                            "FEDTUNE_LOCK_WAIT"])
        assert "after 0 s" in line
    finally:
        holder.stdin.close()
        holder.wait(60)
    assert not record.exists()


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    """Until ``path`` exists (the child's signal) or the child ended; a hang guard only."""
    import selectors

    sel = selectors.DefaultSelector()
    for _ in range(6000):  # at most ten minutes: the child writes the file at once
        if path.exists() or proc.poll() is not None:
            return
        sel.select(0.1)
    raise AssertionError("the lock holder never started")


# ---------------------------------------------------------------- names and paths


@pytest.mark.parametrize("make, needles", [
    (lambda tmp: tmp / ("x" * 300), ["longer than 255"]),
    (lambda tmp: tmp / "/".join(["y" * 250] * 17), ["too long a path"]),
])
def test_a_results_path_too_long_is_one_line(make, needles, run_cli, tmp_path):
    _refused(*run_cli(["run", *TINY, "--results", make(tmp_path)]), needles)
    assert _files(tmp_path) == []


def test_odd_characters_in_a_path_keep_the_message_on_one_line(run_cli, tmp_path):
    odd = tmp_path / "new\nline\x1b[31mred"
    odd.write_text("a file, not a folder")
    line = _refused(*run_cli(["run", *TINY, "--results", odd]), ["\\n", "\\x1b"])
    assert "\x1b" not in line


# ---------------------------------------------------------------- a full disk


class _FillingDisk:
    """``os`` as the atomic write sees it: fsync fails with ENOSPC from call ``full_at`` on."""

    def __init__(self, full_at: int):
        self.calls, self.full_at = 0, full_at

    def __getattr__(self, name: str):
        return getattr(os, name)

    def fsync(self, fd: int) -> None:
        self.calls += 1
        if self.calls >= self.full_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        os.fsync(fd)


def test_a_full_disk_mid_grid_is_one_line_and_the_next_call_completes(tmp_path, capsys,
                                                                       monkeypatch):
    out = tmp_path / "res"
    argv = ["grid", "--profile", str(_tiny_profile(tmp_path, GRID_BASE)), "--results",
            str(out), "--jobs", "1", "--quiet"]
    computed = []
    execute = builtin.execute
    monkeypatch.setattr(builtin, "execute", lambda cfg, **kw: computed.append(cfg.hash)
                        or execute(cfg, **kw))
    disk = _FillingDisk(full_at=2)  # the first record goes in, the second does not
    monkeypatch.setattr(files, "os", disk)
    code = cli.main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1, captured.err
    assert "No space left on device" in lines[0] and "bytes needed" in lines[0]
    assert disk.calls == 3, "the record kept in memory was written once more, then it stopped"
    written = sorted((out / "runs").iterdir())
    assert len(written) == 1 and store.read_record(written[0])["status"] == "ok"

    monkeypatch.setattr(files, "os", os)  # space again
    assert cli.main(argv) == 0
    records = sorted((out / "runs").iterdir())
    assert len(records) == 2 and all(store.read_record(p) for p in records)
    assert len(computed) == 3, "the run whose write failed was computed again once, no more"


def test_a_full_disk_that_frees_up_loses_no_computed_run(tmp_path, capsys, monkeypatch):
    out = tmp_path / "res"
    argv = ["grid", "--profile", str(_tiny_profile(tmp_path, GRID_BASE)), "--results",
            str(out), "--jobs", "1", "--quiet"]

    class _Once(_FillingDisk):
        def fsync(self, fd: int) -> None:
            self.calls += 1
            if self.calls == self.full_at:
                raise OSError(errno.ENOSPC, "No space left on device")
            os.fsync(fd)

    monkeypatch.setattr(files, "os", _Once(full_at=1))
    assert cli.main(argv) == 2
    assert "No space left" in capsys.readouterr().err
    kept = list((out / "runs").iterdir())
    assert len(kept) == 1, "the record whose write failed was kept in memory and written"
    monkeypatch.setattr(builtin, "execute", _forbidden_after(kept[0].stem))
    monkeypatch.setattr(files, "os", os)
    assert cli.main(argv) == 0
    assert len(list((out / "runs").iterdir())) == 2


def _forbidden_after(done: str):
    execute = builtin.execute

    def guarded(cfg, **kw):
        assert cfg.hash != done, "a run already written is not computed again"
        return execute(cfg, **kw)

    return guarded

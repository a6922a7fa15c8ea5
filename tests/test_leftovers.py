"""What a kill leaves, and what a page says when runs are missing (issue 19, parts 5, 6).

A writer killed in the middle of a record, a checkpoint or a corpus leaves a temp file;
the next call that owns the folder removes it. A report or index.html built while planned
runs have no valid record names them on the page; warnings raised inside a notebook go to
the process's log, not to the cells.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_bad_inputs import TINY, _tiny_profile
from test_faults import _wait_for

from fedtune_core import cli, files, recipes
from fedtune_core.errors import diagnostics
from fedtune_core.proxy import glyphs, pretrain, probe
from fedtune_core.runs import store
from fedtune_core.study import grid, report

GRID_BASE = 'weights = "none"\npartition = "iid"\nclients = 2\nsample = 2\nbatch_size = 64'
SHORT = dataclasses.replace(
    recipes.named("glyphs-weak"), corpus=glyphs.CorpusConfig(size=300, seed=21),
    holdout=30, steps=3, batch_size=16, warmup=1)

# a writer stopped inside its write: staged (checkpoints, corpora) or write_text (records)
_WRITER = """
import os, sys, pathlib
from fedtune_core import files
path, ready = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
def hang(fd):
    ready.write_text("writing")
    sys.stdin.read()
if sys.argv[3] == "staged":
    with files.staged(path) as tmp:
        tmp.write_bytes(b"half a file " * 1000)
        hang(None)
else:
    class Hanging:
        def __getattr__(self, name):
            return getattr(os, name)
        fsync = staticmethod(hang)
    files.os = Hanging()
    files.write_text(path, "{}" * 1000)
"""


def _killed_writer(path: Path, how: str, tmp_path: Path) -> None:
    """Start a writer of ``path``, wait until it is inside its write, kill it with -9."""
    ready = tmp_path / f"ready-{path.name}"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(ready), how],
                            stdin=subprocess.PIPE)
    try:
        _wait_for(ready, proc)
        assert proc.poll() is None, "the writer ended before it was killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(60)
        proc.stdin.close()
    assert proc.returncode == -signal.SIGKILL
    assert list(path.parent.glob(".*.tmp")), "the kill left a temp file"
    assert not path.exists(), "nothing half-written under the real name"


def test_a_record_write_killed_is_cleaned_by_the_next_run(run_cli, tmp_path):
    out = tmp_path / "res"
    _killed_writer(out / "runs" / "0123456789abcdef.json", "write_text", tmp_path)
    code, _, err = run_cli(["run", *TINY, "--results", out])
    assert code == 0, err
    assert not list((out / "runs").glob(".*")), "no temp file, no lock left"


def test_a_checkpoint_write_killed_is_cleaned_by_the_next_call(tmp_path, monkeypatch):
    monkeypatch.setattr(probe, "proxy_quality", lambda model, weights: {"probe_acc": 0.5})
    path = recipes.checkpoint_path("vit-tiny", "glyphs-weak", SHORT)
    _killed_writer(path, "staged", tmp_path)
    meta = pretrain.ensure("vit-tiny", "glyphs-weak", SHORT)
    assert Path(meta["path"]) == path and recipes.cached("vit-tiny", "glyphs-weak", SHORT)
    assert not list(path.parent.glob(".*.tmp"))
    _killed_writer(path.with_name("other.pt"), "staged", tmp_path)
    pretrain.ensure("vit-tiny", "glyphs-weak", SHORT)  # cached now: it still cleans
    assert not list(path.parent.glob(".*.tmp"))


def test_a_corpus_write_killed_is_cleaned_by_the_next_load(tmp_path):
    cfg = glyphs.CorpusConfig(size=94, seed=22)
    folder = files.cache_dir() / "corpus"
    _killed_writer(folder / f"glyphs-{cfg.hash}-images.npy", "staged", tmp_path)
    x, y = glyphs.load(cfg)
    assert x.shape[0] == 94 and not list(folder.glob(".*.tmp"))


def test_a_live_writers_temp_file_is_left_alone(tmp_path):
    live = tmp_path / f".x.json.{files.host()}.{os.getpid()}.abc.tmp"
    live.write_text("being written")
    assert files.clean_temps(tmp_path) == 0 and live.exists()


# ---------------------------------------------------------------- partial results


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny profile's two runs, computed once: (profile file, results folder)."""
    tmp = tmp_path_factory.mktemp("partial")
    profile = _tiny_profile(tmp, GRID_BASE)
    out = tmp / "res"
    assert cli.main(["grid", "--profile", str(profile), "--results", str(out), "--jobs", "1",
                     "--quiet"]) == 0
    return profile, out


def _copy(finished, tmp_path: Path) -> tuple[Path, Path]:
    import shutil

    profile, out = finished
    shutil.copytree(out / "runs", tmp_path / "res" / "runs")
    return profile, tmp_path / "res"


@pytest.mark.parametrize("damage, why", [("delete", "no record"), ("garble", "invalid record")])
def test_index_built_with_a_record_missing_names_it_on_the_page(damage, why, finished,
                                                                 tmp_path, capsys):
    profile, out = _copy(finished, tmp_path)
    prof = grid.load_profile(profile)
    victim = prof.runs()[0]
    path = store.record_path(out, victim)
    if damage == "delete":
        path.unlink()
    else:
        path.write_text('{"schema": 1, "status": "ok"')
    assert cli.main(["index", "--profile", str(profile), "--results", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert "Incomplete: 1 planned run(s) have no valid record" in page
    assert victim.hash in page and why in page
    assert "incomplete: 1 planned run(s) absent" in page, "the verdict's evidence says so"
    header = report.header(prof, grid.collect(prof, out))
    assert victim.hash in header and "Incomplete" in header


def test_a_complete_profile_shows_no_notice(finished, capsys):
    profile, out = finished
    prof = grid.load_profile(profile)
    assert "Incomplete" not in report.header(prof, grid.collect(prof, out))
    assert grid.absent(prof, out) == []


def test_warnings_inside_a_notebook_go_to_the_log_not_to_the_cells(tmp_path, monkeypatch):
    cell, log = io.StringIO(), io.StringIO()
    monkeypatch.setitem(sys.modules, "ipykernel", sys)  # as in a Jupyter kernel
    monkeypatch.setattr(sys, "stderr", cell)
    monkeypatch.setattr(sys, "__stderr__", log)
    assert diagnostics() is log
    bad = tmp_path / "runs" / "0123456789abcdef.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps([1]))
    assert store.read_record(bad) is None
    assert cell.getvalue() == "" and "ignoring run record" in log.getvalue()


def test_no_progress_bars_inside_a_notebook(finished, monkeypatch):
    profile, out = finished
    seen = []
    monkeypatch.setattr(grid, "_ensure_runs", lambda cfgs, results, label, **kw:
                        seen.append(kw["progress"]))
    monkeypatch.setitem(sys.modules, "ipykernel", sys)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    grid.ensure(grid.load_profile(profile), out, progress=True)
    assert seen and not any(seen), "bars (escape codes) stay out of the report's cells"

"""A grid's workers pre-train the checkpoints its runs need, in the gaps of one session:
steps before runs, a run only once its checkpoint is there, random-init runs meanwhile,
and the same workers for every phase."""

import dataclasses
import functools
import os
from pathlib import Path

import pytest

from fedtune_core import recipes
from fedtune_core.config import RunConfig
from fedtune_core.proxy import glyphs, pretrain, probe
from fedtune_core.runs import backends, pool
from fedtune_core.study import grid, profile

QUICK = dataclasses.replace(
    recipes.named("glyphs-weak"), corpus=glyphs.CorpusConfig(size=3000, seed=2),
    holdout=200, steps=30, batch_size=32, warmup=5)
GRID = """\
description = "steps"
pretrained = false
seeds = [0]
[base]
dataset = "digits"
partition = "iid"
clients = 2
sample = 2
rounds = 1
batch_size = 64
optimizer = "adamw"
[[tuning_methods]]
model = ["vit-tiny", "clip-tiny"]
method = ["head", "bias"]
weights = ["none", "glyphs-weak", "glyphs-strong"]
"""


def _note(log: Path, text: str) -> None:
    with open(log, "a") as f:  # one short write per line, appended: whole lines
        f.write(f"{os.getpid()} {text}\n")


def _noting_train(log: Path, real):
    def train(model, recipe, *args, **kwargs):
        _note(log, f"train-start {model} {recipe.steps}")
        out = real(model, recipe, *args, **kwargs)
        _note(log, f"train-end {model} {recipe.steps}")
        return out
    return train


def _noting_work(log: Path, real):
    def work(cfg, *args):
        _note(log, f"run {cfg.model} {cfg.weights.split('@')[0]}")
        return real(cfg, *args)
    return work


@pytest.mark.parametrize("jobs", [1, 2])
def test_checkpoints_are_built_once_by_the_workers_before_the_runs_that_need_them(
        monkeypatch, tmp_path, jobs):
    steps = {"glyphs-weak": 30 + 2 * jobs, "glyphs-strong": 31 + 2 * jobs}  # not built before
    for name, n in steps.items():  # seconds long, and no probe
        monkeypatch.setitem(recipes.RECIPES, name, dataclasses.replace(QUICK, steps=n))
    monkeypatch.setattr(probe, "proxy_quality", lambda model, weights: {"probe_acc": 0.5})
    log = tmp_path / "events.log"
    monkeypatch.setattr(pretrain, "train", _noting_train(log, pretrain.train))  # forks inherit
    monkeypatch.setattr(pool, "work", _noting_work(log, pool.work))
    path = tmp_path / "steps.toml"
    path.write_text(GRID)
    records = grid.ensure(profile.load_profile(path), tmp_path / "results", jobs=jobs,
                          progress=False, device="cpu")
    assert len(records) == 12 and all(r["status"] == "ok" for r in records)

    events = [line.split(" ", 1)[1] for line in log.read_text().splitlines()]
    trained = [e for e in events if e.startswith("train-start")]
    assert sorted(trained) == sorted(f"train-start {m} {s}" for m in ("vit-tiny", "clip-tiny")
                                     for s in steps.values()), "each checkpoint once"
    for i, event in enumerate(events):
        _, model, weights = event.split()
        if event.startswith("run") and weights in steps:
            assert f"train-end {model} {steps[weights]}" in events[:i], (
                f"{event} started before its checkpoint was built")
    if jobs > 1:  # a random-init run fills the worker that pre-training leaves idle
        last_build = max(i for i, e in enumerate(events) if e.startswith("train-end"))
        assert any(e.endswith(" none") for e in events[:last_build])
    else:  # one at a time: every step first, in this process
        first_run = next(i for i, e in enumerate(events) if e.startswith("run"))
        assert all(not e.startswith("train") for e in events[first_run:])

    for name in steps:  # the records name the checkpoints the workers built
        for model in ("vit-tiny", "clip-tiny"):
            assert recipes.cached(model, name) is not None


def _fails() -> None:
    raise OSError("disk full")


def test_a_failed_step_stops_the_runs_that_need_it_with_its_error():
    cfg = RunConfig(model="vit-tiny", dataset="digits", weights="none", method="head",
                    clients=2, sample=2, rounds=1)
    step = backends.Step(_fails, "pre-training vit-tiny glyphs-weak")
    started = []
    with backends.Session("pool", backends.Placement("cpu", None, 2)) as session:
        done = session.run([cfg, cfg.replace(seed=1)], claim=lambda c: started.append(c) or True,
                           steps=[step], needs=lambda c: step if c.seed == 1 else None)
        with pytest.raises(backends.StepFailed, match=r"pre-training vit-tiny glyphs-weak "
                                                       r"failed: OSError: disk full"):
            list(done)
    assert cfg.replace(seed=1) not in started, "the run that needed it never started"


def _pid() -> int:
    return os.getpid()


def test_one_session_keeps_its_workers_for_every_call():
    where = backends.Placement("cpu", None, 2)
    with backends.Session("pool", where) as session:
        seen = []
        for _ in range(2):  # two phases: each asks both workers for their process id
            steps = [backends.Step(functools.partial(_pid), f"pid {i}") for i in range(2)]
            list(session.run([], steps=steps, step_done=lambda step, pid: seen.append(pid)))
        workers = list(session.workers)
    assert len(seen) == 4 and set(seen) == {w.proc.pid for w in workers} and len(workers) == 2
    assert os.getpid() not in seen
    assert not any(w.proc.is_alive() for w in workers), "ended with the session"

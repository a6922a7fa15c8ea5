"""The study layer: profiles, the grid and its cache, run_all.sh, the notebooks, findings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from bs4 import BeautifulSoup

from fedtune_core.cli import main
from fedtune_core.errors import ConfigError
from fedtune_core.study import grid, plots, report

ROOT = Path(__file__).resolve().parents[1]
FEDTUNE = str(Path(sys.executable).with_name("fedtune"))
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
FIGURES = list(plots.FIGURES)


def test_paper_profile_expands_to_the_expected_runs(capsys):
    profile = grid.load_profile("paper")
    seeds, variants = 3, 7
    tuning = 2 * variants * 2 * seeds  # 2 models x 7 variants x 2 datasets
    clip_vit = 3 * variants * 2 * seeds  # + ViT-B/32 control
    few_shot = 2 * 3 * 5 * 2 * seeds  # 2 models x 3 methods x 5 shots x 2 datasets
    fl_local = 2 * 2 * 4 * 2 * seeds + 2 * 2 * seeds  # fl + local over 4 partitions, central
    shared = 2 * 2 * seeds  # fl dirichlet:0.5 cifar100 bias/full = tuning_methods runs
    assert [len(profile.planned(e)) for e in grid.EXPERIMENTS] == [tuning, clip_vit, few_shot,
                                                                   fl_local]
    unique = clip_vit + few_shot + fl_local - shared
    assert len(profile.planned()) == len(profile.pending()) == unique  # every rate selected
    assert {c.model for c in profile.pending()} == {"clip-vit-b32", "vit-b16", "vit-b32"}
    groups = 2 * 3 * variants  # (dataset, model, variant); few-shot and FL runs share them
    assert len(profile.groups()) == groups and len(profile.sweeps()) == 3 * groups
    assert main(["grid", "--profile", "paper", "--dry-run", "--results", "/nonexistent"]) == 0
    out = capsys.readouterr().out
    total = unique + 3 * groups
    assert f"lr sweeps       {3 * groups:>6} runs     0 cached{3 * groups:>6} to run\n" in out
    assert (f"{total:>6} runs     0 cached{total:>6} to run ({unique} with rates pending)"
            in out)


def test_a_profile_shares_runs_between_experiments():
    profile = grid.load_profile("demo")
    tuning = {p.cfg.hash for p in profile.planned("tuning_methods")}
    clip_vs_vit = {p.cfg.hash for p in profile.planned("clip_vs_vit")}
    assert clip_vs_vit < tuning  # CLIP vs ViT reads the strong checkpoint's runs of tuning
    assert {p.cfg.weights for p in profile.planned("clip_vs_vit")} == {"glyphs-strong"}
    assert len(profile.planned()) < sum(len(profile.planned(e)) for e in grid.EXPERIMENTS)
    assert {g.key for g in profile.groups()} == {g.key for g in profile.groups("tuning_methods")}


def test_profile_lr_table_and_variants_reach_the_configs():
    profile = grid.load_profile("demo")
    deep = [g for g in profile.groups("tuning_methods")
            if g.fields["method_options"].get("depth") == "deep"]
    assert len(deep) == 2  # one per model
    for group in deep:
        assert group.candidates == profile.lr["prompt"]
        assert {(c.method, c.method_options["depth"]) for c in group.sweeps} == {
            ("prompt", "deep")}
    smoke = grid.load_profile("smoke")  # fixed rates reach their runs as they are
    heads = [c for c in smoke.runs() if c.method == "head"]
    assert heads and all(c.lr == smoke.lr["head"] for c in heads)


@pytest.mark.parametrize("text, message", [
    ('seeds = [0]\nbogus = 1\n', "unknown key(s) bogus"),
    ('[base]\nmodel = "resnet"\n[[tuning_methods]]\nseed = 0\n', "unknown model 'resnet'"),
    ('[[tuning_methods]]\nvariant = ["nope"]\n', "unknown variant 'nope'"),
    ('[[few_shot]]\npartition = "dirichlet:0"\n', "dirichlet alpha must be > 0"),
])
def test_bad_profiles_fail_at_load_naming_the_value(tmp_path, text, message):
    path = tmp_path / "mine.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        grid.load_profile(path)


def test_unknown_profile_is_one_line_and_exit_2(capsys):
    assert main(["grid", "--profile", "nope", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'nope'" in err[0] and "demo" in err[0] and "paper" in err[0]


def _records(folder: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in (folder / "runs").glob("*.json")}


@pytest.mark.slow
def test_run_all_smoke_executes_every_notebook(tmp_path):
    """run_all.sh on the smoke profile: runs, every notebook, HTML, figures, index."""
    env = os.environ | {"FEDTUNE_DATA_DIR": str(tmp_path / "data")}
    done = subprocess.run([str(ROOT / "run_all.sh"), "--profile", "smoke", "--results-root",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Alternative text is missing" not in done.stdout + done.stderr
    out = tmp_path / "smoke"
    assert NOTEBOOKS == list(report.NOTEBOOKS)
    for name in NOTEBOOKS:
        page = out / "reports" / f"{name}.html"
        assert page.stat().st_size > 10_000, name
        text = page.read_text()
        assert "Profile: <code>smoke</code>" in text and "its numbers mean nothing" in text
        assert "Traceback" not in text
        assert "cached," not in text  # the grid's progress lines stay out of the reports
    for name, info in plots.FIGURES.items():
        for ext in ("png", "pdf"):
            assert (out / "figures" / f"{name}.{ext}").stat().st_size > 5_000, name
        page = BeautifulSoup((out / "reports" / f"{info.report}.html").read_text(),
                             "html.parser")
        figure = page.select_one(f"figure#fig-{name}")
        assert figure.img["alt"] == info.alt and figure.figcaption.get_text() == info.caption
    index = (out / "index.html").read_text()
    assert "not measurable in this profile" in index
    assert all(f"reports/{n}.html" in index for n in NOTEBOOKS)
    assert all(f'<img src="figures/{n}.png"' in index for n in FIGURES)
    records = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    profile = grid.load_profile("smoke")
    assert len(records) == len(profile.planned()) + len(profile.sweeps())
    assert all(r["status"] == "ok" for r in records)
    assert "Learning rates chosen on validation data for 2 groups" in (
        out / "reports" / "01_tuning_methods.html").read_text()

    before = _records(out)  # a second pass over the grid computes nothing
    again = subprocess.run([FEDTUNE, "grid", "--profile", "smoke", "--results", str(out)],
                           capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0
    assert "smoke/lr sweeps: 4 runs, 4 cached, 0 to run" in again.stdout
    assert f"{len(before) - 4} cached, 0 to run" in again.stdout
    assert _records(out) == before


@pytest.mark.slow
def test_a_killed_grid_loses_nothing_and_the_next_call_completes_it(tmp_path, paused_cli):
    out = tmp_path / "res"
    cmd = [FEDTUNE, "grid", "--profile", "smoke", "--results", str(out), "--jobs", "1",
           "--quiet"]
    profile = grid.load_profile("smoke")
    sweeps = len(profile.sweeps())  # they run first; kill the grid among the main runs
    total = len(profile.planned()) + sweeps
    proc = paused_cli(cmd[1:], after=sweeps + 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = _records(out)
    assert sweeps + 2 <= len(finished) < total, "the kill should land mid-grid"
    for path in (out / "runs").glob("*.json"):
        assert json.loads(path.read_text())["status"] == "ok"  # no half-written record
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0
    assert f"{len(finished) - sweeps} cached, {total - len(finished)} to run" in done.stdout
    after = _records(out)
    assert len(after) == total
    assert {k: after[k] for k in finished} == finished  # finished runs were not redone
    leftovers = [p.name for p in (out / "runs").iterdir() if p.suffix != ".json"]
    assert leftovers == [], "the killed grid's temp and lock files are gone"


def _hand_made(model: str, variant: str, acc: float) -> list[dict]:
    """Three seeds of a finished run whose numbers would carry a verdict if measured."""
    out = []
    for seed, jitter in enumerate((-0.01, 0.0, 0.01)):
        cfg = {"model": model, "weights": "none", "method": variant, "method_options": {},
               "dataset": "digits", "partition": "iid", "mode": "fl", "seed": seed,
               "clients": 3, "rounds": 2, "lr": 0.001}
        final = {"test_acc": acc + jitter, "train_acc": 0.9, "local_test_acc": 0.8,
                 "bytes_up": 10 if variant != "full" else 1000, "bytes_down": 10}
        rounds = [{"round": r, "test_acc": a} for r, a in enumerate((0.1, acc + jitter))]
        out.append({"status": "ok", "hash": f"{model}-{variant}-{seed}", "seed": seed,
                    "config": cfg, "final": final, "rounds": rounds,
                    "params": {"trainable": 1, "total": 2}, "weights": {"kind": "none"}})
    return out


def test_untrained_profiles_never_claim_a_finding():
    recs = [r for model, shift in (("clip-tiny", 0.1), ("vit-tiny", 0.0))
            for v, acc in (("bias", 0.8), ("full", 0.6), ("head", 0.5))
            for r in _hand_made(model, v, acc + shift)]
    by_experiment = {"tuning_methods": recs, "clip_vs_vit": recs}
    measured = report.findings(report.Profile("hand", "", True, (0, 1, 2), {}, {}, {}, {}),
                               by_experiment)
    assert {"supported"} <= set(measured["verdict"])  # these records do carry verdicts
    profile = grid.load_profile("smoke")
    table = report.findings(profile, by_experiment)
    assert list(table["finding"]) == ["F1", "F2a", "F2b", "F3", "F4"]
    assert set(table["verdict"]) == {"not measurable in this profile"}
    measurable = table["finding"].isin(["F1", "F2a", "F4"])
    assert table.loc[measurable, "evidence"].str.startswith("pipeline check only").all()
    assert set(table["effect"]) == {"-"}  # no interval is offered as evidence either

"""The rehearsal: every run shape of a profile once, tiny, through the real code path."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedtune_core import tuning
from fedtune_core.fl import data, standin
from fedtune_core.study import cost, grid, rehearsal, rehearsal_report, report


def _shapes(profile) -> set:
    return {rehearsal_report.shape(c) for c in [p.cfg for p in profile.planned()]
            + profile.sweeps()}


def test_the_paper_rehearsal_has_every_shape_of_the_paper_profile_once(tmp_path):
    paper = grid.load_profile("paper")
    raw = rehearsal.transform(paper, 2, lambda model, weights: False)
    path = tmp_path / "paper-rehearsal.toml"
    path.write_text(rehearsal.to_toml(raw))
    rehearse = grid.load_profile(path)
    assert rehearse.name == "paper-rehearsal" and rehearse.rehearsal["of"] == "paper"
    assert rehearse.rehearsal["data_dir"] == str(tmp_path / "data")
    runs = [p.cfg for p in rehearse.planned()] + rehearse.sweeps()
    assert len({c.hash for c in runs}) == len(runs) == len(_shapes(paper)) == len(
        _shapes(rehearse))  # one run per shape, and no shape lost
    assert _shapes(rehearse) == _shapes(paper)
    assert len(rehearse.sweeps()) == len(paper.groups())  # one candidate per group
    for cfg in runs:
        assert (cfg.clients, cfg.sample, cfg.batch_size, cfg.seed) == (2, 2, 2, 0)
        assert cfg.rounds == 1 and cfg.weights == "none"
    assert {c.model for c in runs} == {"clip-vit-b32", "vit-b16", "vit-b32"}
    assert {c.partition for c in runs} == {"iid", "dirichlet:0.5", "fewshot:1"}


def test_weights_the_machine_has_are_kept():
    paper = grid.load_profile("paper")
    raw = rehearsal.transform(paper, 32, lambda model, weights: model == "vit-b16")
    weights = {(b["model"], tuple(b["weights"])) for blocks in raw.values()
               if isinstance(blocks, list) and isinstance(blocks[0], dict) for b in blocks}
    assert ("vit-b16", ("auto",)) in weights and ("clip-vit-b32", ("none",)) in weights
    assert raw["base"]["batch_size"] == 32


@pytest.mark.parametrize("dataset, folder", [("cifar10", "cifar-10-batches-py"),
                                             ("cifar100", "cifar-100-python")])
def test_a_stand_in_is_read_by_torchvisions_loader_with_the_real_class_names(tmp_path,
                                                                             dataset, folder):
    train = standin.subset(*standin.generated(dataset, 3), 2, extra=4)
    test = standin.subset(*standin.generated(dataset, 1, seed=1), 1, classes=10)
    standin.write_cifar(dataset, tmp_path, train, test, "generated")
    assert (tmp_path / folder / standin.MARKER).is_file()  # torchvision's folder, marked
    loaded = data.load(dataset, tmp_path)
    assert loaded.class_names == list(standin.names(dataset))
    assert len(loaded.class_names) == (10 if dataset == "cifar10" else 100)
    assert "aquarium_fish" in loaded.class_names or dataset == "cifar10"
    assert len(loaded.train) == 2 * len(loaded.class_names) + 4 and len(loaded.test) == 10
    assert np.array_equal(loaded.train.images.permute(0, 2, 3, 1).numpy(), train[0])
    assert np.array_equal(loaded.train.labels.numpy(), train[1])


def test_without_the_marker_the_loader_checks_the_real_checksums(tmp_path):
    from torchvision import datasets

    assert standin.loader_class(datasets.CIFAR10, tmp_path) is datasets.CIFAR10
    standin.write_cifar("cifar10", tmp_path, standin.generated("cifar10", 1),
                        standin.generated("cifar10", 1), "generated")
    own = standin.loader_class(datasets.CIFAR10, tmp_path)
    assert own is not datasets.CIFAR10 and own.train_list != datasets.CIFAR10.train_list


def test_rehearsal_runs_every_shape_measures_it_and_writes_nothing_else(tmp_path, run_cli):
    folder = tmp_path / "smoke-rehearsal"
    code, out, err = run_cli(["grid", "--profile", "smoke", "--rehearse", "--device", "cpu",
                              "--jobs", "1", "--quiet", "--results", folder])
    assert code == 0, err
    smoke = grid.load_profile("smoke")
    assert f"{len(_shapes(smoke))} of {len(_shapes(smoke))} shapes ok" in out
    assert "Projected cost of profile smoke" in out and "s/step" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smoke-rehearsal"]
    records = [json.loads(p.read_text()) for p in (folder / "runs").glob("*.json")]
    assert len(records) == len(_shapes(smoke))
    for rec in records:
        measured = rec["rehearsal"]
        steps = {"central": 2}.get(rec["config"]["mode"], 4)  # 2 steps x 2 clients, 1 call
        assert measured["train_steps"] == steps and measured["batch_size"] == 2
        assert measured["s_per_step"] > 0 and measured["peak_memory_bytes"] > 2**20
        assert rec["rounds"][-1]["round"] == 1
    text = (folder / "rehearsal.txt").read_text()
    assert text.splitlines()[0].startswith("Rehearsal shapes on cpu")
    again = run_cli(["grid", "--profile", "smoke", "--rehearse", "--device", "cpu", "--quiet",
                     "--results", folder])
    assert again[0] == 0 and "0 to run" in again[1]  # cached, like any grid


def test_a_shape_that_fails_is_named_and_the_exit_is_non_zero(tmp_path, run_cli, monkeypatch):
    real = tuning.prepare

    def prepare(model, method, options=None):  # a method that breaks on one backbone only
        if method == "bias" and model.prefix_tokens == 1 and not model.normalize:
            raise RuntimeError("bias breaks on this backbone")
        return real(model, method, options)

    monkeypatch.setattr(tuning, "prepare", prepare)
    folder = tmp_path / "smoke-rehearsal"
    code, out, err = run_cli(["grid", "--profile", "smoke", "--rehearse", "--device", "cpu",
                              "--jobs", "1", "--quiet", "--experiment", "tuning_methods",
                              "--results", folder])
    assert code == 1
    failed = [line for line in err.splitlines() if line.startswith("failed shape:")]
    assert failed and all("vit-tiny / bias" in line for line in failed)
    assert any("bias breaks on this backbone" in line for line in failed)
    assert "clip-tiny     bias" in out  # the other backbone's shape ran
    assert not (tmp_path / "smoke").exists()


def test_rehearsal_records_never_go_to_the_real_folder(tmp_path, run_cli):
    code, _, err = run_cli(["grid", "--profile", "smoke", "--rehearse", "--results",
                            tmp_path / "smoke"])
    assert code == 2 and "must end in '-rehearsal'" in err
    assert not (tmp_path / "smoke").exists()


def test_reports_on_a_rehearsal_say_so_on_top(tmp_path):
    raw = rehearsal.transform(grid.load_profile("smoke"), 2, lambda m, w: True)
    path = tmp_path / "smoke-rehearsal.toml"
    path.write_text(rehearsal.to_toml(raw))
    header = report.header(grid.load_profile(path), [])
    assert header.startswith("**REHEARSAL of profile `smoke`")
    assert not report.header(grid.load_profile("smoke"), []).startswith("**REHEARSAL")


def test_projection_uses_measured_seconds_and_the_anchor_elsewhere(tmp_path):
    path = tmp_path / "two.toml"
    path.write_text('[base]\ndataset = "cifar10"\nclients = 50\nsample = 10\nrounds = 50\n'
                    '[[tuning_methods]]\nmodel = ["vit-b16", "clip-vit-b32"]\n'
                    'method = "bias"\nlr = 0.001\n')
    profile = grid.load_profile(path)
    vit, clip = (p.cfg for p in profile.planned())
    row = rehearsal_report.Row(rehearsal_report.shape(vit), "ok", batch=4, s_per_step=2.0,
                               s_per_forward=0.1)
    proj = rehearsal_report.projection(profile, [row])["tuning_methods"]
    trained, forwarded = cost.images(vit)
    assert math.isclose(proj["vit-b16"][1], (trained * 2.0 / 4 + forwarded * 0.1) / 3600)
    assert proj["vit-b16"][2] == 0 and proj["clip-vit-b32"][2] == 1  # no measurement: anchor
    assert math.isclose(proj["clip-vit-b32"][1], cost.gpu_hours(clip))

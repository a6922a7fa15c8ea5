"""CI's rehearsal of the paper profile, restricted to what fits a 2-core CPU in minutes.

Every method of the paper on its ViT-B/16 and CLIP ViT-B/32 at 224 (each backbone built
once), then ``run_all.sh --rehearse`` on a profile cut from the paper's (three backbones,
CIFAR-10 and CIFAR-100 stand-ins, every experiment, a learning-rate sweep): every shape
must end ok and every notebook must render, marked REHEARSAL.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import tomllib
from pathlib import Path

import pytest
import torch

from fedtune_core import tuning
from fedtune_core.config import RunConfig
from fedtune_core.fl import data, models, training
from fedtune_core.study import grid, report

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # 224x224 backbones, run_all.sh


@pytest.fixture(scope="module", params=["vit-b16", "clip-vit-b32"])
def backbone(request):
    """The paper's backbone at its real size, random init, built once per module."""
    return request.param, models.build(request.param, ["airplane", "cat"], "none")


def test_every_paper_method_takes_a_step_at_224(backbone):
    name, pristine = backbone
    assert pristine.input_size == 224
    variants = grid.load_profile("paper").variants
    g = torch.Generator().manual_seed(0)
    split = data.Split(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=g),
                       torch.tensor([0, 1]))
    for variant, settings in variants.items():
        model = copy.deepcopy(pristine)
        names = tuning.prepare(model, settings["method"], settings.get("method_options"))
        cfg = RunConfig(model=name, weights="none", method=settings["method"],
                        method_options=settings.get("method_options", {}), batch_size=2,
                        optimizer="adamw", lr=1e-4)
        trainer = training.Trainer(model, names, cfg, torch.device("cpu"))
        before = trainer.state()
        loss = trainer.fit(split, 1, (0, 1, 0))
        assert math.isfinite(loss), variant
        assert any(not torch.equal(before[n], t) for n, t in trainer.state().items()), variant


CUT = """
[[tuning_methods]]
model = "clip-vit-b32"
variant = ["head", "bias"]
dataset = "cifar10"

[[clip_vs_vit]]
model = ["clip-vit-b32", "vit-b16", "vit-b32"]
variant = "bias"

[[few_shot]]
model = "clip-vit-b32"
variant = "bias"
partition = "fewshot:4"
dataset = "cifar10"
clients = 10
sample = 5

[[fl_vs_local]]
model = "clip-vit-b32"
variant = "bias"
partition = "iid"
mode = ["fl", "local", "central"]
"""


def _cut_paper(path: Path) -> None:
    """The paper profile's settings with small blocks; one rate selected, others fixed."""
    text = (ROOT / "fedtune_core" / "study" / "profiles" / "paper.toml").read_text()
    head, _ = text.split("[[tuning_methods]]", 1)
    head = head.replace("bias = { select = [3e-4, 1e-3, 3e-3] }", "bias = 1e-3")
    assert tomllib.loads(head)["lr"]["bias"] == 1e-3
    path.write_text(head + CUT)


def test_run_all_rehearses_a_cut_of_the_paper_profile(tmp_path):
    profile = tmp_path / "cut.toml"
    _cut_paper(profile)
    env = os.environ | {"FEDTUNE_DATA_DIR": str(tmp_path / "no-data")}
    done = subprocess.run([str(ROOT / "run_all.sh"), "--profile", str(profile), "--rehearse",
                           "--device", "cpu", "--results-root", str(tmp_path / "results")],
                          capture_output=True, text=True, env=env, timeout=1500)
    log = done.stdout[-4000:] + done.stderr[-3000:]
    assert done.returncode == 0, log
    out = tmp_path / "results" / "cut-rehearsal"
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["cut-rehearsal"]
    assert "no pre-trained weights here for clip-vit-b32, vit-b16, vit-b32" in done.stdout
    assert "10 of 10 shapes ok" in done.stdout, log  # 9 runs and one sweep
    rehearse = grid.load_profile(out / "cut-rehearsal.toml")
    assert {c.model for c in rehearse.runs(None, grid.rates(rehearse, out))} == {
        "clip-vit-b32", "vit-b16", "vit-b32"}
    for name in report.NOTEBOOKS:
        page = (out / "reports" / f"{name}.html").read_text()
        assert "REHEARSAL of profile <code>cut</code>" in page and "Traceback" not in page
    assert "REHEARSAL of profile <code>cut</code>" in (out / "index.html").read_text()
    assert "aquarium_fish" in (out / "reports" / "04_fl_vs_local.html").read_text()

"""The bf16 autocast path that CUDA runs, exercised on the CPU: one step of every method.

``Trainer(amp=True)`` runs the same ``torch.autocast(..., dtype=torch.bfloat16)`` blocks the
CUDA path runs (on the CPU device type), so a dtype bug in a method, in PEFT's LoRA or in
the head under autocast is caught here without a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedtune_core import tuning
from fedtune_core.config import RunConfig
from fedtune_core.fl import data, models, training

VARIANTS = [(m, {}) for m in tuning.METHODS] + [("prompt", {"depth": "deep"}),
                                                ("adapter", {"input": "mlp"})]


@pytest.mark.parametrize("model_name", ["vit-tiny", "clip-tiny"])
@pytest.mark.parametrize("method, options", VARIANTS)
def test_one_bf16_autocast_step_of_every_method_on_cpu(model_name, method, options):
    cfg = RunConfig(model=model_name, weights="none", method=method, method_options=options,
                    batch_size=4, optimizer="adamw", lr=1e-3)
    model = models.build(model_name, [str(c) for c in range(10)], "none")
    names = tuning.prepare(model, method, options)
    cpu = torch.device("cpu")
    trainer = training.Trainer(model, names, cfg, cpu, amp=True)
    seen = []  # the head's input dtype: bf16 proves the forward ran under autocast
    model.head.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    sent = trainer.state()
    trainer.load(sent)
    g = torch.Generator().manual_seed(0)
    split = data.Split(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=g),
                       torch.arange(4) % 10)
    loss = trainer.fit(split, 1, (0, 1, 0))
    assert math.isfinite(loss)
    assert seen and seen[0] == torch.bfloat16
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)
    back = trainer.state()
    assert back.keys() == sent.keys()
    assert {n: t.dtype for n, t in back.items()} == {n: t.dtype for n, t in sent.items()}
    assert all(torch.isfinite(t).all() for t in back.values())
    assert any(not torch.equal(back[n], sent[n]) for n in sent)  # the step changed something
    acc, test_loss = trainer.evaluate(split)
    assert 0.0 <= acc <= 1.0 and math.isfinite(test_loss)

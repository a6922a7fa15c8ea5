"""Preprocessing a run's images once gives exactly the numbers of preprocessing per batch."""

import pytest
import torch

from fedtune_core import data, fl

CASES = [dict(model="vit-tiny", method="bias"), dict(model="clip-tiny", method="full"),
         dict(model="clip-tiny", method="head"), dict(model="vit-tiny", method="prompt",
                                                      mode="local"),
         dict(model="vit-tiny", method="lora", mode="central"),
         dict(model="clip-tiny", method="bias", val_fraction=0.2)]


def test_a_split_preprocessed_at_once_equals_it_preprocessed_batch_by_batch():
    digits = data.load("digits")
    pre = data.Preprocess(32, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28))
    trainer = fl.Trainer.__new__(fl.Trainer)  # only what to_inputs uses
    trainer.pre, trainer.device, trainer.amp = pre, torch.device("cpu"), False
    whole = trainer.to_inputs(digits.test)[0].images
    assert whole.dtype == torch.float32 and whole.shape == (len(digits.test), 3, 32, 32)
    for start in (0, 32, 330):
        assert torch.equal(whole[start:start + 32], pre(digits.test.images[start:start + 32]))


@pytest.mark.parametrize("changes", CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_a_run_preprocessed_once_has_the_records_numbers_of_per_batch(tiny_config, changes,
                                                                      monkeypatch):
    cfg = tiny_config(clients=4, sample=2, rounds=2, batch_size=32, **changes)
    calls = []
    real = fl.Trainer._inputs
    monkeypatch.setattr(fl.Trainer, "_inputs", lambda self, x: (calls.append(self.on_inputs),
                                                                real(self, x))[1])
    once = fl.execute(cfg, device="cpu")
    assert calls and all(calls)
    calls.clear()
    monkeypatch.setattr(fl, "INPUTS_BUDGET", 0)  # nothing fits: every batch preprocessed
    per_batch = fl.execute(cfg, device="cpu")
    assert calls and not any(calls)
    assert once.rows == [{**r, "seconds": o["seconds"]} for r, o in zip(per_batch.rows,
                                                                      once.rows, strict=True)]
    assert once.final == per_batch.final

"""Preprocessing a run's images once gives exactly the numbers of preprocessing per batch."""

import pytest
import torch

from fedtune_core.fl import builtin, data, inputs, training

CASES = [dict(model="vit-tiny", method="bias"), dict(model="clip-tiny", method="full"),
         dict(model="clip-tiny", method="head"), dict(model="vit-tiny", method="prompt",
                                                      mode="local"),
         dict(model="vit-tiny", method="lora", mode="central"),
         dict(model="clip-tiny", method="bias", val_fraction=0.2)]


def test_a_split_preprocessed_at_once_equals_it_preprocessed_batch_by_batch():
    digits = data.load("digits")
    pre = data.Preprocess(32, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28))
    trainer = training.Trainer.__new__(training.Trainer)  # only what preprocess uses
    trainer.pre, trainer.device, trainer.amp = pre, torch.device("cpu"), False
    whole = inputs.preprocess(trainer, digits.test)[0].images
    assert whole.dtype == torch.float32 and whole.shape == (len(digits.test), 3, 32, 32)
    for start in (0, 32, 330):
        assert torch.equal(whole[start:start + 32], pre(digits.test.images[start:start + 32]))


def test_the_inputs_view_skips_preprocessing_and_shares_the_trainer():
    trainer = training.Trainer.__new__(training.Trainer)
    trainer.pre = lambda x: x * 2
    view = inputs.InputsView(trainer)
    x = torch.ones(2)
    assert torch.equal(trainer._inputs(x), x * 2) and view._inputs(x) is x
    assert view.pre is trainer.pre


@pytest.mark.parametrize("changes", CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_a_run_preprocessed_once_has_the_records_numbers_of_per_batch(tiny_config, changes,
                                                                      monkeypatch):
    cfg = tiny_config(clients=4, sample=2, rounds=2, batch_size=32, **changes)
    per_batch_calls, once_calls = [], []
    real_inputs, real_preprocess = training.Trainer._inputs, inputs.preprocess
    monkeypatch.setattr(training.Trainer, "_inputs",
                        lambda self, x: (per_batch_calls.append(len(x)), real_inputs(self, x))[1])
    monkeypatch.setattr(inputs, "preprocess",
                        lambda *a, **k: (once_calls.append(1), real_preprocess(*a, **k))[1])
    once = builtin.execute(cfg, device="cpu")
    assert once_calls and not per_batch_calls  # preprocessed once, never in a batch
    once_calls.clear()
    monkeypatch.setattr(inputs, "BUDGET", 0)  # nothing fits: every batch preprocessed
    per_batch = builtin.execute(cfg, device="cpu")
    assert per_batch_calls and not once_calls
    assert once.rows == [{**r, "seconds": o["seconds"]} for r, o in zip(per_batch.rows,
                                                                      once.rows, strict=True)]
    assert once.final == per_batch.final

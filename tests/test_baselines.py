"""The baselines do FedAvg's work; zero-shot is the model as built; validation runs never
touch a test set."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtune_core import tuning
from fedtune_core.cli import main
from fedtune_core.config import RunConfig
from fedtune_core.fl import builtin, data, fedavg, models, partition, training

SMALL = ["--model", "vit-tiny", "--weights", "none", "--method", "bias", "--dataset", "digits",
         "--partition", "dirichlet:0.5", "--clients", "5", "--sample", "2", "--rounds", "4",
         "--batch-size", "64", "--local-epochs", "2", "--seed", "3"]


def _record(argv: list[str], results: Path, capsys) -> dict:
    assert main(["run", *argv, "--results", str(results), "--quiet"]) == 0
    return json.loads(Path(capsys.readouterr().out.strip().splitlines()[-1]).read_text())


def test_local_and_central_records_process_fedavgs_samples(tmp_results, capsys):
    avg, local, central = (_record(SMALL + ["--mode", mode], tmp_results, capsys)["final"]
                              for mode in ("fl", "local", "central"))
    # the acceptance bound is 10%; by construction the work is the same, client by client
    per_client = np.array(avg["samples_per_client"])
    assert np.mean(local["samples_per_client"]) == pytest.approx(per_client.mean(), rel=0.1)
    assert local["samples_per_client"] == avg["samples_per_client"]
    assert local["samples_processed"] == avg["samples_processed"] == per_client.sum()
    assert central["samples_processed"] == avg["samples_processed"]
    assert len(central["samples_per_client"]) == 5 and min(central["samples_per_client"]) > 0

    # FedAvg's count by hand: E x |train| of each client, in every round the sampler picks it
    cfg = RunConfig(**{"model": "vit-tiny", "weights": "none", "dataset": "digits",
                          "partition": "dirichlet:0.5", "clients": 5, "sample": 2, "rounds": 4,
                          "local_epochs": 2, "seed": 3})
    labels = data.load("digits").train.labels.numpy()
    sizes = [len(t) for t in partition.split_clients(labels, cfg.partition, 5, 3, 0.2, 10).train]
    picks = np.bincount(np.concatenate(fedavg.schedule(cfg)), minlength=5)
    assert per_client.tolist() == [2 * sizes[c] * picks[c] for c in range(5)]


def test_a_local_client_trains_in_exactly_the_rounds_fedavg_picks_it(tiny_config, monkeypatch):
    cfg = tiny_config(clients=4, sample=2, rounds=3, mode="local")
    calls = []
    real_fit = training.Trainer.fit

    def spy(self, split, epochs, seed):
        calls.append(tuple(seed)[1:])  # (round, client)
        return real_fit(self, split, epochs, seed)

    monkeypatch.setattr(training.Trainer, "fit", spy)
    builtin.execute(cfg, device="cpu")
    local_calls = sorted(calls)
    calls.clear()
    builtin.execute(cfg.replace(mode="fl"), device="cpu")
    expected = sorted((r, int(c)) for r, ids in enumerate(fedavg.schedule(cfg), 1) for c in ids)
    assert local_calls == sorted(calls) == expected
    assert len(expected) == cfg.rounds * cfg.sample


def test_zero_shot_is_the_model_before_any_method_module(tiny_config):
    deep = {"depth": "deep"}
    cfg = tiny_config(method="prompt", method_options=deep, rounds=1)
    out = builtin.execute(cfg, device="cpu")
    dataset = data.load("digits")
    torch.manual_seed(cfg.seed)
    model = models.build(cfg.model, dataset.class_names, "none").eval()
    pre = data.Preprocess(model.input_size, model.mean, model.std)
    with torch.no_grad():
        built = (model(pre(dataset.test.images)).argmax(1) == dataset.test.labels).sum()
        tuning.prepare(model, "prompt", deep)  # the same seed: the same prompts as the run's
        model.eval()
        prompted = model(pre(dataset.test.images)).argmax(1) == dataset.test.labels
    n = len(dataset.test)
    assert out.final["zero_shot_test_acc"] == pytest.approx(built.item() / n, abs=1e-12)
    assert out.final["initial_test_acc"] == out.rows[0]["test_acc"]
    assert out.final["initial_test_acc"] == pytest.approx(prompted.sum().item() / n, abs=1e-12)
    assert built.item() != prompted.sum().item(), "this seed's prompts change the predictions"


class _Untouchable:
    """Stands in for the global test split: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the global test split was touched ({name})")

    def __len__(self):
        raise AssertionError("the global test split was touched (len)")


@pytest.mark.parametrize("mode", ["fl", "local"])
def test_a_validation_run_never_touches_a_test_split(tiny_config, monkeypatch, mode):
    real_load = data.load
    monkeypatch.setattr(data, "load", lambda *a, **k: data.Dataset(
        *(lambda d: (d.name, d.train, _Untouchable(), d.class_names))(real_load(*a, **k))))
    cfg = tiny_config(clients=3, sample=2, rounds=2, val_fraction=0.25, mode=mode)
    with pytest.raises(AssertionError, match="global test split was touched"):
        builtin.execute(cfg.replace(val_fraction=0.0), device="cpu")  # the poison works

    evaluated = []
    real_evaluate = training.Trainer.evaluate
    monkeypatch.setattr(training.Trainer, "evaluate", lambda self, split, *a: (
        evaluated.append(split.labels.clone()), real_evaluate(self, split, *a))[1])
    out = builtin.execute(cfg, device="cpu")

    # every evaluation was on validation data: one client's split, their union, or train
    labels = real_load("digits").train.labels.numpy()
    parts = partition.split_clients(labels, cfg.partition, 3, cfg.seed, 0.2, 10)
    held = partition.hold_out(parts.train, 0.25, cfg.seed)
    allowed = [np.concatenate(held.test), *held.test, *held.train]
    for seen in evaluated:
        assert any(np.array_equal(seen.numpy(), labels[idx]) for idx in allowed)
    assert any(np.array_equal(seen.numpy(), labels[np.concatenate(held.test)])
               for seen in evaluated)
    names = set(out.final) | {k for row in out.rows for k in row}
    assert not [n for n in names if "test" in n], "a validation run reports no test metric"
    assert {"val_acc", "val_loss", "local_val_acc", "initial_val_acc"} <= set(out.final)


def test_hold_out_carves_validation_from_training_only():
    labels = np.arange(200) % 10
    parts = partition.split_clients(labels, "iid", 4, 0, 0.2, 10)
    held = partition.hold_out(parts.train, 0.25, 0)
    for train, kept, val, test in zip(parts.train, held.train, held.test, parts.test,
                                      strict=True):
        assert sorted(np.concatenate([kept, val]).tolist()) == sorted(train.tolist())
        assert not set(val) & set(kept) and not set(val) & set(test)
        assert len(val) == round(0.25 * len(train))
    again = partition.hold_out(parts.train, 0.25, 0)
    assert all(np.array_equal(a, b) for a, b in zip(held.test, again.test, strict=True))

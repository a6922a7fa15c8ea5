"""Tests of fedtune_core.fl.fedavg: FedAvg arithmetic, bytes, real tiny runs in every mode."""

import math

import pytest
import torch

from fedtune_core import tuning
from fedtune_core.fl import builtin, data, features, fedavg, models, training

# ---------------------------------------------------------------- fedavg, by hand


def test_fedavg_two_clients_weighted_by_counts():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([[4.0]])}
    out = fedavg.fedavg([(a, 1), (b, 3)])
    assert set(out) == {"w", "b"}
    # w: (1*1 + 3*3)/4, (1*2 + 3*6)/4;  b: (1*0 + 3*4)/4
    torch.testing.assert_close(out["w"], torch.tensor([2.5, 5.0]))
    torch.testing.assert_close(out["b"], torch.tensor([[3.0]]))
    assert out["b"].shape == (1, 1)


def test_fedavg_three_clients_different_shapes():
    states = [
        ({"m": torch.full((2, 3), 1.0), "v": torch.tensor([10.0, 0.0, -5.0])}, 2),
        ({"m": torch.full((2, 3), 4.0), "v": torch.tensor([0.0, 0.0, 5.0])}, 1),
        ({"m": torch.arange(6.0).view(2, 3), "v": torch.tensor([1.0, 1.0, 1.0])}, 7),
    ]
    out = fedavg.fedavg(states)
    # m = (2*1 + 1*4 + 7*arange)/10 ; v = (2*v0 + v1 + 7*v2)/10
    expected_m = (torch.full((2, 3), 6.0) + 7 * torch.arange(6.0).view(2, 3)) / 10
    torch.testing.assert_close(out["m"], expected_m)
    torch.testing.assert_close(out["v"], torch.tensor([2.7, 0.7, 0.2]))


def test_fedavg_single_client_is_identity():
    s = {"w": torch.randn(4, 5)}
    torch.testing.assert_close(fedavg.fedavg([(s, 17)])["w"], s["w"])


def test_fedavg_keeps_dtypes():
    a = {"h": torch.tensor([1.0, 3.0], dtype=torch.float16), "f": torch.tensor([1.0])}
    b = {"h": torch.tensor([3.0, 5.0], dtype=torch.float16), "f": torch.tensor([2.0])}
    out = fedavg.fedavg([(a, 1), (b, 1)])
    assert out["h"].dtype == torch.float16
    assert out["f"].dtype == torch.float32
    assert out["h"].tolist() == [2.0, 4.0]
    assert out["f"].tolist() == [1.5]


def test_fedavg_accepts_a_generator():
    consumed = []

    def updates():
        for i, n in enumerate((1, 1, 2)):
            consumed.append(i)
            yield {"w": torch.tensor([float(i)])}, n

    out = fedavg.fedavg(updates())
    assert consumed == [0, 1, 2]
    torch.testing.assert_close(out["w"], torch.tensor([(0 + 1 + 2 * 2) / 4]))


def test_fedavg_does_not_mutate_inputs():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([5.0])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([7.0])}
    copies = [{k: v.clone() for k, v in s.items()} for s in (a, b)]
    out = fedavg.fedavg([(a, 2), (b, 3)])
    for s, c in zip((a, b), copies, strict=True):
        assert s.keys() == c.keys()
        for k in s:
            assert torch.equal(s[k], c[k])
    out["w"] += 100  # the result shares no storage with the inputs
    assert torch.equal(a["w"], copies[0]["w"]) and torch.equal(b["w"], copies[1]["w"])


@pytest.mark.parametrize(
    "updates, match",
    [
        ([], "at least one"),
        ([({"w": torch.ones(1)}, 0)], "positive"),
        ([({"w": torch.ones(1)}, 2), ({"w": torch.ones(1)}, 0)], "positive"),
        ([({"w": torch.ones(1)}, -1)], "positive"),
        ([({"w": torch.ones(1)}, 1), ({"v": torch.ones(1)}, 1)], "different parameter names"),
        ([({"w": torch.ones(1)}, 1), ({"w": torch.ones(1), "v": torch.ones(1)}, 1)],
         "different parameter names"),
    ],
)
def test_fedavg_bad_input_raises_value_error(updates, match):
    with pytest.raises(ValueError, match=match):
        fedavg.fedavg(updates)


def test_fedavg_different_shapes_raise():
    with pytest.raises(ValueError):
        fedavg.fedavg([({"w": torch.ones(2)}, 1), ({"w": torch.tensor([3.0])}, 1)])


def test_fedavg_empty_generator_raises():
    with pytest.raises(ValueError):
        fedavg.fedavg(x for x in [])


def test_state_bytes():
    state = {"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.float16),
             "c": torch.zeros(2, 2, 2, dtype=torch.float64)}
    assert fedavg.state_bytes(state) == 12 * 4 + 5 * 2 + 8 * 8
    assert fedavg.state_bytes({}) == 0


# ---------------------------------------------------------------- real tiny runs


def _trainable_numel(cfg) -> int:
    """Trainable parameters of cfg's model, counted independently of fl."""
    model = models.build(cfg.model, [str(i) for i in range(10)], cfg.weights, text_head=False)
    tuning.prepare(model, cfg.method, cfg.method_options)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["bias", "lora"])
def test_fl_rows_and_bytes(tiny_config, method):
    cfg = tiny_config(method=method, clients=3, sample=2, rounds=2)
    out = builtin.execute(cfg, device="cpu")
    numel = _trainable_numel(cfg)
    assert out.state_bytes == 4 * numel
    assert out.trainable == numel
    assert out.trainable < out.total
    assert [r["round"] for r in out.rows] == [0, 1, 2]
    assert out.rows[0]["bytes_up"] == out.rows[0]["bytes_down"] == 0
    assert out.rows[0]["train_loss"] is None
    for row in out.rows[1:]:
        assert row["bytes_down"] == cfg.sample * out.state_bytes
        assert row["bytes_up"] == cfg.sample * out.state_bytes  # full trainable state back
        assert 0 <= row["test_acc"] <= 1
        assert math.isfinite(row["train_loss"]) and row["train_loss"] > 0
    assert out.final["bytes_up"] == cfg.rounds * cfg.sample * out.state_bytes
    assert out.final["bytes_down"] == out.final["bytes_up"]
    assert out.final["initial_test_acc"] == out.rows[0]["test_acc"]
    assert out.final["test_acc"] == out.rows[-1]["test_acc"]
    assert out.weights == {"kind": "none", "source": None, "quick_gelu": None,
                           "quick_gelu_from": "not a CLIP backbone"}
    assert out.device == "cpu"


def test_eval_every_skips_rounds_but_not_the_last(tiny_config):
    out = builtin.execute(tiny_config(method="head", rounds=3, eval_every=2), device="cpu")
    assert [r["test_acc"] is None for r in out.rows] == [False, True, False, False]


def _strip_seconds(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_same_seed_same_run_other_seed_other_run(tiny_config):
    cfg = tiny_config(method="bias", clients=3, sample=2, rounds=2)
    first = builtin.execute(cfg, device="cpu")
    second = builtin.execute(cfg, device="cpu")
    assert _strip_seconds(first.rows) == _strip_seconds(second.rows)
    assert first.final == second.final
    other = builtin.execute(cfg.replace(seed=1), device="cpu")
    assert _strip_seconds(other.rows) != _strip_seconds(first.rows)
    assert [r["train_loss"] for r in other.rows[1:]] != [r["train_loss"] for r in first.rows[1:]]


FINAL_KEYS = {"test_acc", "test_loss", "local_test_acc", "train_acc", "initial_test_acc",
              "bytes_up", "bytes_down"}


def _check_final(out, cfg):
    assert FINAL_KEYS <= set(out.final)
    for key in ("test_acc", "local_test_acc", "train_acc", "initial_test_acc"):
        assert 0.0 <= out.final[key] <= 1.0, key
    assert [r["round"] for r in out.rows] == list(range(cfg.rounds + 1))


def test_local_mode(tiny_config):
    cfg = tiny_config(method="bias", mode="local", clients=3, sample=2, rounds=2)
    out = builtin.execute(cfg, device="cpu")
    _check_final(out, cfg)
    assert all(r["bytes_up"] == 0 and r["bytes_down"] == 0 for r in out.rows)
    assert out.final["bytes_up"] == out.final["bytes_down"] == 0
    assert "test_acc_std" in out.final
    assert all(r["test_acc_std"] >= 0 for r in out.rows[1:])


def test_central_mode(tiny_config):
    cfg = tiny_config(method="bias", mode="central", clients=3, sample=2, rounds=2)
    out = builtin.execute(cfg, device="cpu")
    _check_final(out, cfg)
    assert all(r["bytes_up"] == 0 and r["bytes_down"] == 0 for r in out.rows)
    assert out.final["bytes_up"] == out.final["bytes_down"] == 0
    assert all(math.isfinite(r["train_loss"]) for r in out.rows[1:])
    assert out.rows[-1]["train_loss"] != builtin.execute(cfg.replace(mode="fl"),
                                                    device="cpu").rows[-1]["train_loss"]


@pytest.mark.slow
def test_fedavg_full_finetuning_learns_digits(tiny_config):
    cfg = tiny_config(method="full", optimizer="adamw", lr=1e-3, partition="iid", clients=4,
                      sample=4, local_epochs=3, rounds=8, batch_size=32)
    out = builtin.execute(cfg, device="cpu")
    # chance is 0.1; measured ~0.72 (seeds 0-2)
    assert out.final["initial_test_acc"] < 0.2
    assert out.final["test_acc"] >= 0.5
    assert out.rows[-1]["train_loss"] < out.rows[1]["train_loss"]


# ---------------------------------------------------------------- CLIP head


def test_clip_head_is_clips_own_similarity():
    import open_clip

    torch.manual_seed(0)
    model = models.build("clip-tiny", [str(i) for i in range(10)], "none").eval()
    # open_clip initialises logit_scale to log(1/0.07): the features carry that norm
    assert model.feature_scale == pytest.approx(1 / 0.07, rel=1e-5)
    norms = model.head.weight.detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(10), atol=1e-5, rtol=0)
    assert torch.count_nonzero(model.head.bias) == 0
    assert not torch.allclose(model.head.weight[0], model.head.weight[1])  # one row per class

    # the logits are CLIP's zero-shot logits, computed by open_clip itself
    torch.manual_seed(0)
    models.register_configs()
    clip = open_clip.create_model("fedtune-clip-tiny").eval()
    text = open_clip.get_tokenizer("fedtune-clip-tiny")([f"a photo of a {i}." for i in range(10)])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        image_f = torch.nn.functional.normalize(clip.encode_image(x), dim=-1)
        text_f = torch.nn.functional.normalize(clip.encode_text(text), dim=-1)
        reference = clip.logit_scale.exp() * image_f @ text_f.T
        torch.testing.assert_close(model(x), reference, atol=1e-4, rtol=1e-4)


def test_clip_initial_accuracy_is_recorded(tiny_config):
    cfg = tiny_config(model="clip-tiny", method="head", rounds=1)
    out = builtin.execute(cfg, device="cpu")
    assert out.final["initial_test_acc"] == out.rows[0]["test_acc"]

    # the same number, computed independently: the zero-shot head on the test set
    dataset = data.load("digits")
    torch.manual_seed(cfg.seed)
    model = models.build("clip-tiny", dataset.class_names, "none").eval()
    pre = data.Preprocess(model.input_size, model.mean, model.std)
    with torch.no_grad():
        logits = model(pre(dataset.test.images))
    correct = (logits.argmax(1) == dataset.test.labels).sum().item()
    assert out.final["initial_test_acc"] == pytest.approx(correct / len(dataset.test), abs=1e-12)


# ---------------------------------------------------------------- head-only on cached features


def _counting_encoder(monkeypatch) -> list[int]:
    """Count the encoder's forward calls inside builtin.execute; the list holds one count."""
    calls = [0]
    build = models.build

    def counted(*args, **kwargs):
        model = build(*args, **kwargs)
        model.encoder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        return model

    monkeypatch.setattr(models, "build", counted)
    return calls


@pytest.mark.parametrize("model, mode, val", [("clip-tiny", "fl", 0.0), ("vit-tiny", "local", 0.0),
                                              ("clip-tiny", "central", 0.0),
                                              ("vit-tiny", "fl", 0.2)])
def test_head_only_on_cached_features_gives_the_uncached_metrics(tiny_config, monkeypatch,
                                                                 model, mode, val):
    cfg = tiny_config(model=model, method="head", mode=mode, clients=3, sample=2, rounds=3,
                      batch_size=32, optimizer="adamw", lr=3e-3, partition="dirichlet:0.5",
                      val_fraction=val)
    calls = _counting_encoder(monkeypatch)
    cached = builtin.execute(cfg, device="cpu")
    encoded = calls[0] - 1  # the first call: the zero-shot evaluation before the method
    uncached = builtin.execute(cfg, device="cpu", cache_features=False)
    # the encoder ran once over the training pool and (not in a validation run) the test
    # set, in batches of 512
    dataset = data.load("digits")
    test_batches = 0 if val else math.ceil(len(dataset.test) / 512)
    assert encoded == math.ceil(len(dataset.train) / 512) + test_batches
    assert calls[0] - encoded > 10 * encoded
    assert len(cached.rows) == len(uncached.rows) == cfg.rounds + 1
    prefix = "val" if val else "test"
    for a, b in zip(cached.rows, uncached.rows, strict=True):
        for key in (f"{prefix}_acc", f"{prefix}_loss", "train_loss", "bytes_up", "bytes_down"):
            assert (a[key] is None) == (b[key] is None)
            if a[key] is not None:
                assert a[key] == pytest.approx(b[key], abs=1e-5), (a["round"], key)
    assert cached.final.keys() == uncached.final.keys()
    for key, value in cached.final.items():
        assert value == pytest.approx(uncached.final[key], abs=1e-5), key
    assert cached.rows[-1][f"{prefix}_loss"] != cached.rows[0][f"{prefix}_loss"]  # it trained


def test_cached_features_refuse_a_trainable_encoder():
    model = models.build("vit-tiny", [str(i) for i in range(10)], "none")
    trainer = training.Trainer(model, tuning.prepare(model, "bias"), None, torch.device("cpu"))
    assert not trainer.encoder_frozen
    with pytest.raises(ValueError, match="frozen encoder"):
        features.encode(trainer, data.load("digits").test)


def test_foreach_adamw_trains_the_for_loop_steps_numbers(tiny_config, monkeypatch):
    cfg = tiny_config(method="full", clients=4, sample=2, rounds=1, batch_size=32)
    fast = builtin.execute(cfg, device="cpu")
    real = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: real(*a, **k | {"foreach": False}))
    slow = builtin.execute(cfg, device="cpu")
    assert [r["test_acc"] for r in fast.rows] == [r["test_acc"] for r in slow.rows]
    assert [r["train_loss"] for r in fast.rows] == [r["train_loss"] for r in slow.rows]
    assert fast.final == slow.final


def test_a_worker_keeps_built_models_and_its_runs_keep_their_numbers(tiny_config, monkeypatch):
    cfgs = [tiny_config(model="vit-tiny", method="bias"),
            tiny_config(model="vit-tiny", method="lora"),  # the same build: a kept copy
            tiny_config(model="clip-tiny", method="prompt", seed=1),
            tiny_config(model="vit-tiny", method="adapter")]
    fresh = [builtin.execute(c, device="cpu") for c in cfgs]
    built = []
    real = builtin.models.build
    monkeypatch.setattr(builtin.models, "build",
                        lambda *a, **k: built.append(a[0]) or real(*a, **k))
    builtin.keep_built_models()
    try:
        kept = [builtin.execute(c, device="cpu") for c in cfgs]
    finally:
        builtin.keep_built_models(False)
    assert built == ["vit-tiny", "clip-tiny"]  # each build once, then copies
    for a, b in zip(fresh, kept, strict=True):
        assert [r["test_acc"] for r in a.rows] == [r["test_acc"] for r in b.rows]
        assert [r["train_loss"] for r in a.rows] == [r["train_loss"] for r in b.rows]
        assert a.final == b.final

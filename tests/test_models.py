"""Tests of fedtune_core.fl.models (weights resolution, checkpoint loading) and data.Preprocess."""

import pytest
import torch

from fedtune_core.errors import ConfigError
from fedtune_core.fl import data, models

NAMES = [str(i) for i in range(10)]


def _timm_checkpoint(model: models.Classifier) -> dict[str, torch.Tensor]:
    """What timm's own state dict of this model looks like: encoder plus ``head.*``."""
    state = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    state["head.weight"] = model.head.weight.detach().clone()
    state["head.bias"] = model.head.bias.detach().clone()
    return state


def _assert_same_tensors(loaded: dict, saved: dict) -> None:
    assert set(loaded) <= set(saved)
    assert len(loaded) > 0
    for key, tensor in loaded.items():
        assert torch.equal(tensor, saved[key]), key


@pytest.mark.parametrize("name", ["vit-tiny", "vit-b16"])
def test_timm_checkpoint_round_trip(tmp_path, name):
    torch.manual_seed(1)
    saved = _timm_checkpoint(models.build(name, NAMES, "none"))
    path = tmp_path / "vit.pth"
    torch.save(saved, path)

    torch.manual_seed(2)  # a fresh random init would differ from the saved one
    fresh = models.build(name, NAMES, "none").encoder.state_dict()
    assert not torch.equal(fresh["blocks.0.attn.qkv.weight"], saved["blocks.0.attn.qkv.weight"])

    torch.manual_seed(2)
    loaded = models.build(name, NAMES, weights=str(path))
    state = loaded.encoder.state_dict()
    assert set(state) == set(saved) - {"head.weight", "head.bias"}
    _assert_same_tensors(state, saved)
    assert loaded.head.out_features == len(NAMES)


def test_clip_checkpoint_round_trip(tmp_path):
    import open_clip

    torch.manual_seed(1)
    models.register_configs()
    clip = open_clip.create_model("fedtune-clip-tiny")
    path = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), path)
    saved = clip.visual.state_dict()

    torch.manual_seed(2)
    fresh = models.build("clip-tiny", NAMES, "none").encoder.state_dict()
    assert not torch.equal(fresh["conv1.weight"], saved["conv1.weight"])

    torch.manual_seed(2)
    loaded = models.build("clip-tiny", NAMES, weights=str(path)).encoder.state_dict()
    assert set(loaded) == set(saved)
    _assert_same_tensors(loaded, saved)


def test_weights_dir_is_used_by_auto(tmp_path, monkeypatch):
    torch.manual_seed(1)
    saved = _timm_checkpoint(models.build("vit-tiny", NAMES, "none"))
    path = tmp_path / "vit-tiny.pth"
    torch.save(saved, path)
    monkeypatch.setenv("FEDTUNE_WEIGHTS_DIR", str(tmp_path))

    assert models.resolve_weights("vit-tiny", "auto") == ("file", str(path))
    # other backbones without a file there fall back to their hub tag / no weights
    assert models.resolve_weights("vit-b16", "auto") == ("hub", "augreg_in21k")
    assert models.resolve_weights("clip-tiny", "auto") == ("recipe", "glyphs-strong")
    assert models.resolve_weights("vit-tiny", "none") == ("none", None)

    torch.manual_seed(2)
    loaded = models.build("vit-tiny", NAMES, "auto").encoder.state_dict()
    _assert_same_tensors(loaded, saved)


def test_resolve_weights_without_weights_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("FEDTUNE_WEIGHTS_DIR", raising=False)
    assert models.resolve_weights("vit-b32", "auto") == ("hub", "augreg_in21k")
    assert models.resolve_weights("clip-vit-b32", "auto") == ("hub", "openai")
    assert models.resolve_weights("vit-tiny", "auto") == ("recipe", "glyphs-strong")
    path = tmp_path / "w.pt"
    path.write_bytes(b"")
    assert models.resolve_weights("vit-b16", str(path)) == ("file", str(path))
    assert models.resolve_weights("vit-b16", "augreg_in1k") == ("hub", "augreg_in1k")


def test_missing_checkpoint_is_a_config_error(tmp_path):
    path = tmp_path / "nowhere" / "vit.pth"
    with pytest.raises(ConfigError, match="does not exist") as info:
        models.build("vit-tiny", NAMES, weights=str(path))
    assert str(path) in str(info.value)


def test_garbage_checkpoint_is_a_config_error(tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(b"this is not a checkpoint \x00\x01\x02" * 8)
    with pytest.raises(ConfigError, match="is not a checkpoint") as info:
        models.build("vit-tiny", NAMES, weights=str(path))
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value), "one line"


def test_checkpoint_of_another_architecture_is_a_config_error(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(_timm_checkpoint(models.build("vit-tiny", NAMES, "none")), path)
    with pytest.raises(ConfigError, match="does not fit vit-b16: .* of another shape"):
        models.build("vit-b16", NAMES, weights=str(path))


@pytest.mark.parametrize("name", ["vit-b32", "clip-vit-b32"])
def test_offline_hub_without_weights_points_to_weights_flag(monkeypatch, tmp_path, name):
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE, "conftest must set HF_HUB_OFFLINE=1"
    monkeypatch.delenv("FEDTUNE_WEIGHTS_DIR", raising=False)
    # an empty hub cache, whatever this machine has downloaded before
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match="--weights") as info:
        models.build(name, NAMES, "auto")
    assert name in str(info.value)


def test_unknown_hub_tag_lists_valid_tags():
    with pytest.raises(ConfigError, match="'bogus'") as info:
        models.build("vit-b16", NAMES, weights="bogus")
    message = str(info.value)
    assert "augreg_in21k" in message and "valid choices" in message
    with pytest.raises(ConfigError, match="openai"):
        models.check_weights("clip-vit-b32", "bogus")


def test_unknown_model_is_a_config_error():
    with pytest.raises(ConfigError, match="'vit-huge'.*valid choices.*vit-tiny"):
        models.build("vit-huge", NAMES, "none")


@pytest.mark.parametrize("name, size, width, normalize",
                         [("vit-tiny", 32, 64, False), ("clip-tiny", 32, 64, True)])
def test_tiny_classifier_shapes(name, size, width, normalize):
    model = models.build(name, NAMES, "none")
    assert model.input_size == size
    assert model.width == width
    assert model.normalize is normalize
    assert len(model.blocks) == 2
    assert model.prefix_tokens == 1
    out = model(torch.randn(3, 3, size, size))
    assert out.shape == (3, len(NAMES))
    if normalize:  # CLIP: features of norm = the logit scale
        feats = model.features(torch.randn(2, 3, size, size))
        torch.testing.assert_close(feats.norm(dim=-1), torch.full((2,), model.feature_scale))


# ---------------------------------------------------------------- preprocessing


MEAN = (0.1, 0.2, 0.3)
STD = (0.5, 0.25, 0.125)


def test_preprocess_resizes_and_normalises_a_constant_image():
    values = (0, 100, 255)
    images = torch.stack([torch.full((8, 8), v, dtype=torch.uint8) for v in values])[None]
    out = data.Preprocess(32, MEAN, STD)(images)
    assert out.shape == (1, 3, 32, 32)
    assert out.dtype == torch.float32
    for c, v in enumerate(values):
        expected = (v / 255 - MEAN[c]) / STD[c]
        torch.testing.assert_close(out[0, c], torch.full((32, 32), expected), atol=1e-5, rtol=0)


def test_preprocess_keeps_an_image_of_the_right_size():
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    out = data.Preprocess(16, MEAN, STD)(images)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (images.float() / 255 - mean) / std, atol=1e-5, rtol=0)


def test_preprocess_downsizes():
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    out = data.Preprocess(32, MEAN, STD)(images)
    assert out.shape == (2, 3, 32, 32)
    # area-like downsizing keeps the per-channel mean close
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    expected = ((images.float() / 255 - mean) / std).mean(dim=(2, 3))
    torch.testing.assert_close(out.mean(dim=(2, 3)), expected, atol=0.05, rtol=0)


def test_digits_dataset():
    ds = data.load("digits")
    assert ds.class_names == list(data.DIGIT_NAMES)
    assert ds.train.images.dtype == torch.uint8
    assert ds.train.images.shape[1:] == (3, 8, 8)
    assert len(ds.train) + len(ds.test) == 1797
    assert set(ds.test.labels.tolist()) == set(range(10))
    assert ds.train.images.max() == 255  # 0..16 scaled to 0..255


def test_preprocess_clamps_the_bicubic_overshoot_before_normalising():
    images = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    images[..., :, 4:] = 255  # a sharp vertical edge: bicubic rings on both sides of it
    raw = torch.nn.functional.interpolate(images.float(), size=(32, 32), mode="bicubic",
                                          align_corners=False)
    assert raw.min() < -1 and raw.max() > 256, "the test image must overshoot"
    out = data.Preprocess(32, MEAN, STD)(images)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (raw.clamp(0, 255) / 255 - mean) / std, atol=1e-5, rtol=0)
    low, high = (0 - mean) / std, (1 - mean) / std
    assert (out >= low - 1e-6).all() and (out <= high + 1e-6).all()

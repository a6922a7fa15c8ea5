"""CLIP's activation (QuickGELU or GELU) from the weights, or an explicit option.

OpenAI released CLIP as TorchScript archives trained with QuickGELU; open_clip's hub tags
say which activation their weights need; a plain state dict says nothing.
"""

import warnings

import open_clip
import pytest
import torch

from fedtune_core.cli import main
from fedtune_core.config import RunConfig
from fedtune_core.errors import ConfigError
from fedtune_core.fl import models

NAMES = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """A tiny CLIP saved twice: as a TorchScript archive (OpenAI's format) and a state dict."""
    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(1)
    models.register_configs()
    clip = open_clip.create_model("fedtune-clip-tiny").eval()
    example = (torch.randn(1, 3, 32, 32), torch.zeros(1, clip.context_length, dtype=torch.long))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter; the archive is all we need
        torch.jit.trace(clip, example, check_trace=False, strict=False).save(folder / "jit.pt")
    torch.save(clip.state_dict(), folder / "state.pt")
    return {"archive": str(folder / "jit.pt"), "state": str(folder / "state.pt"),
            "visual": clip.visual.state_dict()}


def test_an_openai_archive_runs_with_quick_gelu_and_loads_its_weights(clip_files):
    path = clip_files["archive"]
    assert models.is_torchscript(path) and not models.is_torchscript(clip_files["state"])
    assert models.resolve_quick_gelu("clip-tiny", path) == (True, "an OpenAI TorchScript archive")
    model = models.build("clip-tiny", NAMES, path)
    assert models.uses_quick_gelu(model.encoder)
    loaded = model.encoder.state_dict()
    assert set(loaded) == set(clip_files["visual"])
    assert all(torch.equal(loaded[k], v) for k, v in clip_files["visual"].items())


def test_gelu_on_an_openai_archive_stops_with_one_line(clip_files, tmp_results, capsys):
    with pytest.raises(ConfigError, match="contradicts an OpenAI TorchScript archive"):
        RunConfig(model="clip-tiny", weights=clip_files["archive"], quick_gelu=False)
    code = main(["run", "--model", "clip-tiny", "--weights", clip_files["archive"],
                 "--quick-gelu", "false", "--results", str(tmp_results)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "QuickGELU" in err[0]
    assert not list(tmp_results.rglob("*.json")), "nothing written"


def test_a_state_dict_follows_the_option_else_the_backbone(clip_files):
    path = clip_files["state"]
    assert not models.uses_quick_gelu(models.build("clip-tiny", NAMES, path).encoder)
    forced = models.build("clip-tiny", NAMES, path, quick_gelu=True)
    assert models.uses_quick_gelu(forced.encoder)
    assert all(torch.equal(forced.encoder.state_dict()[k], v)
               for k, v in clip_files["visual"].items())
    # a file standing in for clip-vit-b32 (OpenAI weights): assumed QuickGELU, and said so
    quick, why = models.resolve_quick_gelu("clip-vit-b32", path)
    assert quick is True and why == "assumed from clip-vit-b32's 'openai' weights"
    assert models.resolve_quick_gelu("clip-vit-b32", path, False) == (False, "set in the config")


@pytest.mark.parametrize("tag, quick", [("openai", True), ("laion2b_s34b_b79k", False)])
def test_hub_tags_decide_and_a_contradiction_stops(tag, quick):
    assert models.resolve_quick_gelu("clip-vit-b32", tag) == (quick, f"the {tag!r} weights")
    RunConfig(model="clip-vit-b32", weights=tag, quick_gelu=quick)  # agreeing: fine
    with pytest.raises(ConfigError, match=f"quick_gelu={not quick} contradicts the '{tag}'"):
        RunConfig(model="clip-vit-b32", weights=tag, quick_gelu=not quick)


def test_quick_gelu_is_for_clip_only_and_recorded(tiny_config):
    with pytest.raises(ConfigError, match="CLIP backbones only"):
        RunConfig(model="vit-tiny", quick_gelu=True)
    with pytest.raises(ConfigError, match="true, false or unset"):
        RunConfig(model="clip-tiny", quick_gelu="yes")
    assert RunConfig(model="clip-tiny", quick_gelu=True).hash != RunConfig(model="clip-tiny").hash
    from fedtune_core.fl import builtin

    out = builtin.execute(tiny_config(model="clip-tiny", quick_gelu=True, rounds=1), device="cpu")
    assert out.weights["quick_gelu"] is True and out.weights["quick_gelu_from"] == (
        "set in the config")

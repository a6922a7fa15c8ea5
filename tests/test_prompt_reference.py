"""Visual prompts against a forward pass written out by hand, for both backbone families.

The hand-written encoder: patch embedding, class token and position embeddings, the
prompts spliced in after the class token, the pre-norm (open_clip ``ln_pre``; timm
``norm_pre``), the blocks (deep: fresh prompts before every later block), the prompts
dropped, then the final norm, class-token pooling and (CLIP) the projection.
"""

import copy

import pytest
import torch
from torch import nn

from fedtune_core import tuning
from fedtune_core.fl import models

CLASSES = [str(i) for i in range(10)]


def _embed_timm(enc: nn.Module, x: torch.Tensor) -> torch.Tensor:
    patches = enc.patch_embed(x)  # (B, N, D)
    cls = enc.cls_token.expand(x.shape[0], -1, -1)
    return torch.cat([cls, patches], dim=1) + enc.pos_embed


def _embed_open_clip(enc: nn.Module, x: torch.Tensor) -> torch.Tensor:
    patches = enc.conv1(x).flatten(2).transpose(1, 2)  # (B, N, D)
    cls = enc.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1)
    return torch.cat([cls, patches], dim=1) + enc.positional_embedding


def _head_timm(enc: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return enc.fc_norm(enc.norm(tokens)[:, 0])


def _head_open_clip(enc: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return enc.ln_post(tokens)[:, 0] @ enc.proj


PARTS = {  # family -> (embedding, pre-norm name, blocks, pooling head)
    "vit-tiny": (_embed_timm, "norm_pre", lambda e: e.blocks, _head_timm),
    "clip-tiny": (_embed_open_clip, "ln_pre", lambda e: e.transformer.resblocks,
                  _head_open_clip),
}


def _by_hand(plain: nn.Module, prompts: torch.Tensor, x: torch.Tensor, name: str,
             after_pre_norm: bool = False):
    """The prompted encoder's features, computed on an un-hooked copy of the encoder.

    ``after_pre_norm`` splices the first prompts in after the pre-norm instead (the placement
    this project used before, which skipped CLIP's ``ln_pre``).
    """
    embed, pre_norm, blocks_of, pool = PARTS[name]
    tokens = embed(plain, x)
    batch, tokens_per_layer = x.shape[0], prompts.shape[1]
    first = prompts[0].expand(batch, -1, -1)
    if after_pre_norm:
        tokens = getattr(plain, pre_norm)(tokens)
    tokens = torch.cat([tokens[:, :1], first, tokens[:, 1:]], dim=1)
    if not after_pre_norm:
        tokens = getattr(plain, pre_norm)(tokens)
    for i, block in enumerate(blocks_of(plain)):
        if 0 < i < len(prompts):
            fresh = prompts[i].expand(batch, -1, -1)
            tokens = torch.cat([tokens[:, :1], fresh, tokens[:, 1 + tokens_per_layer:]], dim=1)
        tokens = block(tokens)
    tokens = torch.cat([tokens[:, :1], tokens[:, 1 + tokens_per_layer:]], dim=1)
    return pool(plain, tokens)


@pytest.mark.parametrize("name", list(PARTS))
@pytest.mark.parametrize("depth", ["shallow", "deep"])
def test_prompted_encoder_matches_a_hand_written_forward(name, depth):
    model = models.build(name, CLASSES, "none", text_head=False).eval()
    with torch.no_grad():  # a pre-norm that is not the identity-affine LayerNorm of random init
        for param in getattr(model.encoder, PARTS[name][1]).parameters():
            param.uniform_(0.5, 2.0)
    plain = copy.deepcopy(model.encoder)  # the same weights, without the prompt hooks
    tuning.prepare(model, "prompt", {"depth": depth, "tokens": 3})
    with torch.no_grad():
        model.prompt.embeddings.normal_(3.0, 5.0)  # far from what a LayerNorm puts out
        x = torch.randn(2, 3, model.input_size, model.input_size)
        hooked = model.encoder(x)
        reference = _by_hand(plain, model.prompt.embeddings, x, name)
        torch.testing.assert_close(hooked, reference, atol=1e-5, rtol=1e-5)
        # the comparison can tell the placements apart: after CLIP's ln_pre is another model
        other = _by_hand(plain, model.prompt.embeddings, x, name, after_pre_norm=True)
        assert torch.allclose(other, hooked, atol=1e-5) == (name == "vit-tiny")


def test_timm_pre_norm_is_an_identity_in_the_vits_we_use():
    for name in ("vit-tiny", "vit-b16"):
        with torch.device("meta"):  # the modules only: no weights
            model = models.build(name, CLASSES, "none", text_head=False)
        assert isinstance(model.encoder.norm_pre, nn.Identity), name


def test_clip_prompts_enter_block_0_normalised_like_the_patch_tokens():
    model = models.build("clip-tiny", CLASSES, "none", text_head=False).eval()
    tuning.prepare(model, "prompt", {"tokens": 4})  # VPT's init: small against the patches
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(torch.randn(2, 3, model.input_size, model.input_size))
    norms = seen[0].norm(dim=-1)
    prompt_norms, patch_norms = norms[:, 1:5], norms[:, 5:]
    ratio = prompt_norms.mean() / patch_norms.mean()
    assert 0.5 < ratio < 2.0, f"prompt/patch token norm entering block 0: {ratio:.3f}"

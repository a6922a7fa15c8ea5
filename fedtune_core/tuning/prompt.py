"""Visual prompt tuning (VPT): learnable tokens prepended to the patch sequence.

``shallow``: ``tokens`` prompts are inserted after the prefix (class) token, into the
embedded sequence (patches + position embeddings) where it enters the encoder's pre-norm:
open_clip's ``ln_pre`` (so CLIP's prompts are normalised like its patch tokens, as in CLIP
VPT implementations such as IVLP and MaPLe) and timm's ``norm_pre`` (an identity in these
ViTs, so that is VPT's "before the first block"). ``deep``: fresh prompts replace them
before every later block, in the residual stream. After the last block the prompt
positions are dropped, so the encoder's final norm and pooling see the original sequence.
Works on encoders whose blocks take ``(batch, sequence, width)`` as first argument: timm's
ViT and open_clip's VisionTransformer (batch-first). The module itself is
:class:`fedtune_core.tuning.layers.VisualPrompt`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedtune_core.errors import check_choice, check_int
from fedtune_core.tuning.registry import register

if TYPE_CHECKING:
    from torch import nn

DEPTHS = ("shallow", "deep")
MAX_TOKENS = 4096


@dataclass(frozen=True)
class PromptConfig:
    """Options of visual prompt tuning."""

    tokens: int = 10  # prompts per layer
    depth: str = "shallow"  # shallow (input layer only) or deep (every block)

    def __post_init__(self) -> None:
        check_int("prompt tokens", self.tokens, 1, MAX_TOKENS)
        check_choice("prompt depth", self.depth, DEPTHS)


@register("prompt", PromptConfig, lr={"sgd": 0.1, "adamw": 3e-3})
def apply(model: nn.Module, cfg: PromptConfig) -> list[str]:
    """Add visual prompts to the encoder; train them."""
    from fedtune_core.tuning.layers import VisualPrompt, entry_norm, patch_dim

    blocks = model.blocks
    layers = len(blocks) if cfg.depth == "deep" else 1
    model.prompt = VisualPrompt(layers, cfg.tokens, model.width, patch_dim(model.encoder),
                                model.prefix_tokens)
    entry_norm(model.encoder).register_forward_pre_hook(model.prompt.insert, with_kwargs=True)
    for layer in range(1, layers):
        blocks[layer].register_forward_pre_hook(model.prompt.replace(layer), with_kwargs=True)
    blocks[-1].register_forward_hook(model.prompt.drop)
    return ["prompt.embeddings"]

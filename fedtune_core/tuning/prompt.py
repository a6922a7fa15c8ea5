"""Visual prompt tuning (VPT): learnable tokens prepended to the patch sequence.

``shallow``: ``tokens`` prompts are inserted after the prefix (class) token before the
first block. ``deep``: fresh prompts replace them before every block. After the last block
the prompt positions are dropped, so the encoder's norm and pooling see the original
sequence. Works on any encoder whose blocks take ``(batch, sequence, width)`` as first
argument: timm's ViT and open_clip's VisionTransformer (batch-first).
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from fedtune_core.errors import check_choice, check_range
from fedtune_core.tuning.registry import register

DEPTHS = ("shallow", "deep")


@dataclass(frozen=True)
class PromptConfig:
    """Options of visual prompt tuning."""

    tokens: int = 10  # prompts per layer
    depth: str = "shallow"  # shallow (input layer only) or deep (every block)

    def __post_init__(self) -> None:
        check_range("prompt tokens", self.tokens, 1)
        check_choice("prompt depth", self.depth, DEPTHS)


class VisualPrompt(nn.Module):
    """The prompt embeddings (one set per layer they enter) and the hooks that place them."""

    def __init__(self, layers: int, tokens: int, width: int, patch_dim: int, prefix: int):
        super().__init__()
        bound = math.sqrt(6.0 / float(patch_dim + width))  # VPT's xavier-uniform bound
        self.embeddings = nn.Parameter(torch.empty(layers, tokens, width).uniform_(-bound, bound))
        self.tokens = tokens
        self.prefix = prefix

    def insert(self, block: nn.Module, args: tuple, kwargs: dict):
        """Before the first block: splice the prompts in after the prefix tokens."""
        x = args[0]
        p = self.embeddings[0].to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, : self.prefix], p, x[:, self.prefix:]], dim=1)
        return (x, *args[1:]), kwargs

    def replace(self, layer: int):
        """Before block ``layer`` (deep VPT): overwrite the prompt positions with fresh ones."""

        def hook(block: nn.Module, args: tuple, kwargs: dict):
            x = args[0]
            p = self.embeddings[layer].to(x.dtype).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, : self.prefix], p, x[:, self.prefix + self.tokens:]], dim=1)
            return (x, *args[1:]), kwargs

        return hook

    def drop(self, block: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """After the last block: remove the prompt positions."""
        return torch.cat([output[:, : self.prefix], output[:, self.prefix + self.tokens:]], dim=1)


def _patch_dim(encoder: nn.Module) -> int:
    """in_channels * patch_h * patch_w of the patch embedding conv (timm or open_clip)."""
    conv = next(m for m in encoder.modules() if isinstance(m, nn.Conv2d))
    return conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]


@register("prompt", PromptConfig, lr={"sgd": 0.1, "adamw": 3e-3})
def apply(model: nn.Module, cfg: PromptConfig) -> list[str]:
    """Add visual prompts to the encoder; train them."""
    blocks = model.blocks
    layers = len(blocks) if cfg.depth == "deep" else 1
    model.prompt = VisualPrompt(layers, cfg.tokens, model.width, _patch_dim(model.encoder),
                                model.prefix_tokens)
    blocks[0].register_forward_pre_hook(model.prompt.insert, with_kwargs=True)
    for layer in range(1, layers):
        blocks[layer].register_forward_pre_hook(model.prompt.replace(layer), with_kwargs=True)
    blocks[-1].register_forward_hook(model.prompt.drop)
    return ["prompt.embeddings"]

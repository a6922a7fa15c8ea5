"""The torch modules that tuning methods add to a backbone (adapters, visual prompts).

Kept apart from the method modules, which import no torch at import time: the CLI reads
the methods' names and options without loading torch; a method's ``apply`` imports these.
"""

import math

import torch
from torch import nn


class Adapter(nn.Module):
    """Bottleneck ``dim -> width -> dim``; zero output at initialisation."""

    def __init__(self, dim: int, width: int, scale: float):
        super().__init__()
        self.down = nn.Linear(dim, width)
        self.up = nn.Linear(width, dim)
        self.scale = scale
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.down(x))) * self.scale


def parallel(adapter: Adapter):
    """A forward hook on an MLP that adds ``adapter`` of the MLP's input to its output."""

    def hook(mlp: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + adapter(args[0])

    return hook


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


def patch_dim(encoder: nn.Module) -> int:
    """in_channels * patch_h * patch_w of the patch embedding conv (timm or open_clip)."""
    conv = next(m for m in encoder.modules() if isinstance(m, nn.Conv2d))
    return conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]

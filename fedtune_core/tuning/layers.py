"""The torch modules that tuning methods add to a backbone (adapters, visual prompts).

Kept apart from the method modules, which import no torch at import time: the CLI reads
the methods' names and options without loading torch; a method's ``apply`` imports these.
"""

import math

import torch
from torch import nn

MLP_NORMS = ("norm2", "ln_2")  # timm, open_clip: the norm in front of each block's MLP


class Adapter(nn.Module):
    """Bottleneck ``dim -> width -> dim``; zero output at initialisation.

    Added to an MLP's output by a forward hook: :meth:`add_from_mlp_input` (the MLP's input)
    or :meth:`add_from_residual` (the tensor :meth:`remember`, a pre-hook on the MLP's norm,
    kept: the residual stream).
    """

    def __init__(self, dim: int, width: int, scale: float):
        super().__init__()
        self.down = nn.Linear(dim, width)
        self.up = nn.Linear(width, dim)
        self.scale = scale
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self._source: torch.Tensor | None = None  # residual input, set just before the MLP runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.down(x))) * self.scale

    def remember(self, norm: nn.Module, args: tuple) -> None:
        """Forward pre-hook on ``norm2``: keep the residual stream it is about to normalise."""
        self._source = args[0]

    def add_from_mlp_input(self, mlp: nn.Module, args: tuple, output: torch.Tensor):
        """Forward hook on the MLP, ``mlp`` input variant: ``mlp(h) + adapter(h)``."""
        return output + self(args[0])

    def add_from_residual(self, mlp: nn.Module, args: tuple, output: torch.Tensor):
        """Forward hook on the MLP, ``residual`` variant: ``mlp(norm2(x')) + adapter(x')``."""
        source, self._source = self._source, None
        if source is None:
            raise RuntimeError("adapter: the MLP ran without its norm2 first")
        return output + self(source)


def mlp_norm(block: nn.Module) -> nn.Module:
    """The norm in front of ``block``'s MLP (timm ``norm2``, open_clip ``ln_2``)."""
    for name in MLP_NORMS:
        if isinstance(norm := getattr(block, name, None), nn.Module):
            return norm
    raise ValueError(f"adapter: block {type(block).__name__} has none of {', '.join(MLP_NORMS)}")


class VisualPrompt(nn.Module):
    """The prompt embeddings (one set per layer they enter) and the hooks that place them."""

    def __init__(self, layers: int, tokens: int, width: int, patch_dim: int, prefix: int):
        super().__init__()
        bound = math.sqrt(6.0 / float(patch_dim + width))  # VPT's xavier-uniform bound
        self.embeddings = nn.Parameter(torch.empty(layers, tokens, width).uniform_(-bound, bound))
        self.tokens = tokens
        self.prefix = prefix

    def insert(self, norm: nn.Module, args: tuple, kwargs: dict):
        """Before the encoder's pre-norm: splice the prompts in after the prefix tokens."""
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


ENTRY_NORMS = ("ln_pre", "norm_pre")  # open_clip, timm: the norm the embedded tokens enter


def entry_norm(encoder: nn.Module) -> nn.Module:
    """The norm the embedded token sequence enters before the blocks (``ln_pre``/``norm_pre``)."""
    for name in ENTRY_NORMS:
        if isinstance(norm := getattr(encoder, name, None), nn.Module):
            return norm
    raise ValueError(f"prompt: encoder {type(encoder).__name__} has none of "
                     f"{', '.join(ENTRY_NORMS)}")


def patch_dim(encoder: nn.Module) -> int:
    """in_channels * patch_h * patch_w of the patch embedding conv (timm or open_clip)."""
    conv = next(m for m in encoder.modules() if isinstance(m, nn.Conv2d))
    return conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]

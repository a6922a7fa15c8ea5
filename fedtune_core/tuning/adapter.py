"""AdaptFormer-style adapters: a bottleneck parallel to every MLP block.

``mlp(x) + scale * up(relu(down(x)))`` with ``up`` zero-initialised, so the model's
outputs are unchanged at initialisation. The adapter is attached as ``<block>.adapter`` (not
inside the MLP: open_clip's MLP is an ``nn.Sequential`` that would run it in line) and added
by a forward hook on the MLP, so every original parameter keeps its name.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from fedtune_core.errors import check_range
from fedtune_core.tuning.registry import register


@dataclass(frozen=True)
class AdapterConfig:
    """Options of the adapter."""

    width: int = 64  # bottleneck width
    scale: float = 0.1  # the adapter's output is multiplied by this (AdaptFormer's s)

    def __post_init__(self) -> None:
        check_range("adapter width", self.width, 1)
        check_range("adapter scale", self.scale, 0, low_open=True)


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


def _parallel(adapter: Adapter):
    def hook(mlp: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + adapter(args[0])

    return hook


@register("adapter", AdapterConfig, lr={"sgd": 0.05, "adamw": 1e-3})
def apply(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Attach an adapter parallel to the MLP of every block; train the adapters."""
    for block in model.blocks:
        block.adapter = Adapter(model.width, cfg.width, cfg.scale)
        block.mlp.register_forward_hook(_parallel(block.adapter))
    return [name for name, _ in model.named_parameters() if ".adapter." in name]

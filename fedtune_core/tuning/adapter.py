"""AdaptFormer-style adapters: a bottleneck parallel to every MLP block.

``mlp(x) + scale * up(relu(down(x)))`` with ``up`` zero-initialised, so the model's
outputs are unchanged at initialisation. The adapter is attached as ``<block>.adapter`` (not
inside the MLP: open_clip's MLP is an ``nn.Sequential`` that would run it in line) and added
by a forward hook on the MLP, so every original parameter keeps its name. The module itself
is :class:`fedtune_core.tuning.layers.Adapter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedtune_core.errors import check_int, check_range
from fedtune_core.tuning.registry import register

if TYPE_CHECKING:
    from torch import nn

MAX_WIDTH = 65536


@dataclass(frozen=True)
class AdapterConfig:
    """Options of the adapter."""

    width: int = 64  # bottleneck width
    scale: float = 0.1  # the adapter's output is multiplied by this (AdaptFormer's s)

    def __post_init__(self) -> None:
        check_int("adapter width", self.width, 1, MAX_WIDTH)
        check_range("adapter scale", self.scale, 0, low_open=True)


@register("adapter", AdapterConfig, lr={"sgd": 0.05, "adamw": 1e-3})
def apply(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Attach an adapter parallel to the MLP of every block; train the adapters."""
    from fedtune_core.tuning.layers import Adapter, parallel

    for block in model.blocks:
        block.adapter = Adapter(model.width, cfg.width, cfg.scale)
        block.mlp.register_forward_hook(parallel(block.adapter))
    return [name for name, _ in model.named_parameters() if ".adapter." in name]

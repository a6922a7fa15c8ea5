"""AdaptFormer-style adapters: a bottleneck parallel to every MLP block.

A transformer block computes ``x' = x + attn(norm1(x))``, then ``x' + mlp(norm2(x'))``.
The parallel adapter adds ``scale * up(relu(down(a)))`` to the MLP's output, with ``up``
zero-initialised, so the model's outputs are unchanged at initialisation. Its input ``a``:

- ``residual`` (default, AdaptFormer's): the residual stream ``x'`` entering the MLP
  sub-block, before ``norm2``;
- ``mlp``: the MLP's own input ``norm2(x')`` (a variant: the adapter then sees normalised
  tokens, like the MLP it runs beside).

The adapter is attached as ``<block>.adapter`` (not inside the MLP: open_clip's MLP is an
``nn.Sequential`` that would run it in line) and added by a forward hook on the MLP, so
every original parameter keeps its name. For ``residual``, a forward pre-hook on ``norm2``
(open_clip: ``ln_2``) hands the adapter the tensor that norm receives. The module itself
is :class:`fedtune_core.tuning.layers.Adapter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedtune_core.errors import check_choice, check_int, check_range
from fedtune_core.tuning.registry import register

if TYPE_CHECKING:
    from torch import nn

MAX_WIDTH = 65536
INPUTS = ("residual", "mlp")


@dataclass(frozen=True)
class AdapterConfig:
    """Options of the adapter."""

    width: int = 64  # bottleneck width
    scale: float = 0.1  # the adapter's output is multiplied by this (AdaptFormer's s)
    input: str = "residual"  # residual (AdaptFormer: x' before norm2) or mlp (norm2's output)

    def __post_init__(self) -> None:
        check_int("adapter width", self.width, 1, MAX_WIDTH)
        check_range("adapter scale", self.scale, 0, low_open=True)
        check_choice("adapter input", self.input, INPUTS)


@register("adapter", AdapterConfig, lr={"sgd": 0.05, "adamw": 1e-3})
def apply(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Attach an adapter parallel to the MLP of every block; train the adapters."""
    from fedtune_core.tuning.layers import Adapter, mlp_norm

    for block in model.blocks:
        block.adapter = adapter = Adapter(model.width, cfg.width, cfg.scale)
        if cfg.input == "residual":
            mlp_norm(block).register_forward_pre_hook(adapter.remember)
            block.mlp.register_forward_hook(adapter.add_from_residual)
        else:
            block.mlp.register_forward_hook(adapter.add_from_mlp_input)
    return [name for name, _ in model.named_parameters() if ".adapter." in name]

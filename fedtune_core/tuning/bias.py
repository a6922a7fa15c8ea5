"""Bias-only tuning (BitFit): every bias term of the image encoder, plus the head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedtune_core.tuning.registry import register

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class BiasConfig:
    """Bias tuning has no options."""


def is_bias(name: str) -> bool:
    """True for bias terms: linear, conv and LayerNorm ``.bias``, and fused ``in_proj_bias``."""
    return name.rsplit(".", 1)[-1] in ("bias", "in_proj_bias")


@register("bias", BiasConfig, lr={"sgd": 0.05, "adamw": 1e-3})
def apply(model: nn.Module, cfg: BiasConfig) -> list[str]:
    """Train every bias of the encoder (linear, conv and LayerNorm)."""
    return [name for name, _ in model.encoder.named_parameters(prefix="encoder") if is_bias(name)]

"""Full fine-tuning: every parameter of the image model trains."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedtune_core.tuning.registry import register

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class FullConfig:
    """Full fine-tuning has no options."""


@register("full", FullConfig, lr={"sgd": 0.005, "adamw": 1e-4})
def apply(model: nn.Module, cfg: FullConfig) -> list[str]:
    """Train every parameter of the encoder (and the head)."""
    return [name for name, _ in model.named_parameters()]

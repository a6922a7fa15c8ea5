"""Head-only tuning (linear probing): the lower bound of the backbone family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedtune_core.tuning.registry import register

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class HeadConfig:
    """Head-only tuning has no options: the head always trains."""


@register("head", HeadConfig, lr={"sgd": 0.05, "adamw": 1e-3})
def apply(model: nn.Module, cfg: HeadConfig) -> list[str]:
    """Train nothing but the classifier head (added by :func:`prepare`)."""
    return []

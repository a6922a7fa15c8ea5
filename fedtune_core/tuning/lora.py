"""LoRA through Hugging Face PEFT on the attention projections of every block.

open_clip's blocks use ``nn.MultiheadAttention``: PEFT adapts it as a whole (its fused
q,k,v ``in_proj`` and its ``out_proj``). Targeting ``out_proj`` alone would apply silently
and do nothing, because MultiheadAttention never calls that module's forward. For a like-
for-like comparison the timm ViT gets the same two projections: fused ``qkv`` and ``proj``.
``B`` is zero-initialised, so outputs are unchanged at initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedtune_core.errors import check_int, check_range
from fedtune_core.tuning.registry import register

if TYPE_CHECKING:
    from torch import nn

MAX_RANK = 4096


@dataclass(frozen=True)
class LoraConfig:
    """Options of LoRA."""

    rank: int = 8  # r
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the LoRA input

    def __post_init__(self) -> None:
        check_int("lora rank", self.rank, 1, MAX_RANK)
        check_range("lora alpha", self.alpha, 0, low_open=True)
        check_range("lora dropout", self.dropout, 0, 0.9)


def attention_targets(model: nn.Module) -> list[str]:
    """Full names of the modules LoRA adapts: each block's attention projections."""
    from torch import nn

    targets = []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            targets.append(name)
        elif name.endswith((".attn.qkv", ".attn.proj")) and isinstance(module, nn.Linear):
            targets.append(name)
    return targets


@register("lora", LoraConfig, lr={"sgd": 0.05, "adamw": 1e-3})
def apply(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Inject LoRA into the attention of every block; train the low-rank factors."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    targets = attention_targets(model)
    if not targets:
        raise ValueError("LoRA found no attention projection to adapt in this model")
    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=targets)
    inject_adapter_in_model(peft_cfg, model)
    return [name for name, _ in model.named_parameters() if ".lora_" in name]

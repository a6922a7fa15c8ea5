"""The feature cache of head-only runs: the frozen encoder run once, the head trained on it.

When only the head trains, the encoder's output for an image never changes, so a run
encodes its splits once (:func:`encode`) and trains and evaluates through
:class:`HeadView`, the trainer's view of splits of features: the same model, parameters,
optimizer, data order and batches, only the encoder is not run again. The metrics are those
of the uncached path (tested to 1e-5 in fp32 on CPU).
"""

from __future__ import annotations

import torch

from fedtune_core.fl import data
from fedtune_core.fl.training import Trainer


@torch.no_grad()
def encode(trainer: Trainer, *splits: data.Split, batch: int = 512) -> list[data.Split]:
    """``splits`` with ``images`` replaced by the features the head takes (float32,
    N x width; CLIP's already L2-normalised), the encoder in eval mode. Not inference
    mode: the head trains on these tensors.

    Raises:
        ValueError: something besides the head trains, so features would go stale.
    """
    if not trainer.encoder_frozen:
        raise ValueError("cached features need a frozen encoder; trainable: "
                         f"{[n for n in trainer.params if not n.startswith('head.')][:3]}")
    trainer.model.eval()
    out = []
    meter = trainer.meter
    t0 = meter.clock() if meter else 0.0
    for split in splits:
        chunks = [split.images[s:s + batch] for s in range(0, len(split), batch)]
        with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=trainer.amp):
            feats = [trainer.model.features(trainer._inputs(c)).float() for c in chunks]
        out.append(data.Split(torch.cat(feats), split.labels))
    if meter:
        meter.forward_seconds += meter.clock() - t0
        meter.forward_images += sum(len(s) for s in splits)
    return out


class HeadView(Trainer):
    """``trainer`` seen through its head: :meth:`fit`, :meth:`evaluate` and the steps of
    every mode take splits of features (:func:`encode`) and run the head only. It shares
    the trainer's model, trainable parameters, device and meter (a view, not a copy)."""

    def __init__(self, trainer: Trainer):  # a view: no Trainer.__init__
        if not trainer.encoder_frozen:
            raise ValueError("a head view needs a frozen encoder")
        self.__dict__.update(trainer.__dict__)

    def _logits(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return self.model.head(inputs).float()

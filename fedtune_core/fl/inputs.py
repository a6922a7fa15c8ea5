"""Preprocessing once: a run's images as model inputs, computed before the first round.

Resizing, clamping and normalising (:class:`fedtune_core.fl.data.Preprocess`) gives the same
tensor for an image in every batch of every round, so a run whose preprocessed images fit
:data:`BUDGET` computes them once (:func:`preprocessed`) and trains and evaluates through
:class:`InputsView`, the trainer's view of splits that already hold model inputs. Each image
is preprocessed on its own, so the inputs are bitwise those a batch would get
(``tests/test_preprocess_once.py``). A rehearsal and a large dataset (CIFAR at 224 px:
36 GB) stay per batch.
"""

from __future__ import annotations

import torch

from fedtune_core.config import RunConfig
from fedtune_core.fl import data, models
from fedtune_core.fl.training import Trainer

BUDGET = 256 * 2**20  # bytes: the most a run's preprocessed images may take


def fits(cfg: RunConfig, dataset: data.Dataset, model: models.Classifier) -> bool:
    """Whether the run's images, preprocessed (float32 at the model's input size), fit
    :data:`BUDGET` (the demo's digits: 22 MB)."""
    count = len(dataset.train) + (0 if cfg.val_fraction else len(dataset.test))
    return count * 3 * model.input_size ** 2 * 4 <= BUDGET


@torch.no_grad()
def preprocess(trainer: Trainer, *splits: data.Split, batch: int = 512) -> list[data.Split]:
    """``splits`` with ``images`` replaced by the model inputs the trainer's preprocessing
    makes of them (float32)."""
    out = []
    for split in splits:
        chunks = [split.images[s:s + batch] for s in range(0, len(split), batch)]
        with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=trainer.amp):
            inputs = [trainer.pre(c) for c in chunks] or [trainer.pre(split.images)]
        out.append(data.Split(torch.cat(inputs), split.labels))
    return out


def preprocessed(trainer: Trainer, dataset: data.Dataset, cfg: RunConfig,
                 dev: torch.device) -> data.Dataset:
    """The dataset as model inputs (:func:`preprocess`); the test set only where the run
    uses it (a validation run never touches it)."""
    splits = [dataset.train.to(dev)] + ([] if cfg.val_fraction else [dataset.test.to(dev)])
    inputs = preprocess(trainer, *splits)
    test = inputs[1] if len(inputs) > 1 else dataset.test
    return data.Dataset(dataset.name, inputs[0], test, dataset.class_names)


class InputsView(Trainer):
    """``trainer`` for splits of model inputs (:func:`preprocessed`): every batch skips
    preprocessing. It shares the trainer's model, parameters, device and meter (a view, not
    a copy)."""

    def __init__(self, trainer: Trainer):  # a view: no Trainer.__init__
        self.__dict__.update(trainer.__dict__)

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        return images

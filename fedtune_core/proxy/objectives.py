"""The two pre-training objectives of the tiny backbones, on the same glyph images.

* ``supervised`` (timm ViT): 47-way classification of the characters, label smoothing.
* ``contrastive`` (open_clip CLIP): image-text contrastive learning with captions that name
  the character ("a photo of the digit seven", "the number 7", "a lowercase g", ...), among
  them the runs' own prompt ``"a photo of a {}."`` with the digits' class names, so that a
  CLIP head built from that prompt is a real zero-shot classifier. Plain InfoNCE treats
  the other captions of the same character as negatives, and there are only 47 characters;
  the targets therefore count every caption of the same character as a positive (UniCL).
  Each image draws one of its character's captions; a caption drawn twice in a batch is
  encoded once.

Each objective builds the whole model that a checkpoint file holds (the timm model with
its 47-way head; the full CLIP with its text tower) and says how to score images against
the 47 classes, which gives the pre-training accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedtune_core.fl import models
from fedtune_core.fl.data import Preprocess
from fedtune_core.proxy import glyphs


def captions(label: int) -> list[str]:
    """The captions of one character class; digits include the runs' prompt and names."""
    char = glyphs.CLASSES[label]
    if char.isdigit():
        word = glyphs.class_name(label)
        return [models.CLIP_PROMPT.format(word), f"a photo of the digit {word}.",
                f"the number {word}", f"the number {char}", f"the digit {char}",
                f"a printed {word}", f"an image of a {char}.", f"{word}"]
    case = "capital" if char.isupper() else "lowercase"
    alias = "an uppercase letter" if char.isupper() else "a small letter"
    twin = char.swapcase() in glyphs.CLASSES  # "the letter a" would name two classes
    plain = [] if twin else [f"the letter {char}", f"a photo of the letter {char}."]
    return [models.CLIP_PROMPT.format(f"{case} {char}"), f"a {case} {char}", f"{alias} {char}",
            f"the {case} letter {char}", f"an image of a {case} {char}.", *plain]


@dataclass
class Objective:
    """How one backbone family pre-trains: its model, its loss, its class scores."""

    net: nn.Module
    preprocess: nn.Module
    zero_shot = False  # whether the classifier built from it is a zero-shot classifier

    def loss(self, images: torch.Tensor, labels: torch.Tensor,
             rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, batch accuracy) on a preprocessed batch."""
        raise NotImplementedError

    @torch.no_grad()
    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """47-way class scores of a preprocessed batch."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after each optimizer step (nothing by default)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Exactly what the model's loader expects in a checkpoint file."""
        return {k: v.clone() for k, v in self.net.state_dict().items()}


class Supervised(Objective):
    """A timm ViT with a 47-way head, cross-entropy with the recipe's label smoothing."""

    def __init__(self, spec: models.BackboneSpec, recipe: Any):
        import timm

        net = timm.create_model(spec.arch, num_classes=len(glyphs.CLASSES), **spec.kwargs)
        cfg = timm.data.resolve_model_data_config(net)
        pre = _preprocess(net.patch_embed.img_size[-1], cfg["mean"], cfg["std"],
                          cfg["interpolation"])
        super().__init__(net, pre)
        self.smoothing = recipe.label_smoothing

    def loss(self, images, labels, rng):
        logits = self.net(images)
        acc = (logits.argmax(1) == labels).float().mean()
        return F.cross_entropy(logits, labels, label_smoothing=self.smoothing), acc

    def scores(self, images):
        return self.net(images)


class Contrastive(Objective):
    """The full open_clip CLIP, UniCL targets: same character = positive pair.

    Only the token embeddings that the captions use train (as a small table mapped onto
    the vocabulary's rows, initialised with the recipe's ``token_std``), so an AdamW step
    does not sweep the whole 49k-row vocabulary; :meth:`state_dict` writes them back.
    """

    zero_shot = True

    def __init__(self, spec: models.BackboneSpec, recipe: Any):
        import open_clip

        models.register_configs()
        with models.quiet_root_logger(True):  # "initialised randomly": that is the point
            clip = open_clip.create_model(spec.arch, pretrained=None)
        pre = clip.visual.preprocess_cfg
        size = pre["size"] if isinstance(pre["size"], int) else pre["size"][-1]
        super().__init__(clip, _preprocess(size, pre["mean"], pre["std"],
                                           pre.get("interpolation", "bicubic")))
        tokenizer = open_clip.get_tokenizer(spec.arch)
        texts = [captions(c) for c in range(len(glyphs.CLASSES))]
        width = max(len(t) for t in texts)
        self.counts = torch.tensor([len(t) for t in texts])
        flat = tokenizer([t[i % len(t)] for t in texts for i in range(width)])
        self.tokens = flat.view(len(texts), width, -1)  # (class, caption, context)
        self.prompts = tokenizer([models.CLIP_PROMPT.format(glyphs.class_name(c))
                                  for c in range(len(glyphs.CLASSES))])
        self.used = torch.unique(torch.cat([flat.flatten(), self.prompts.flatten()]))
        self.table = _UsedTokens(clip.token_embedding, self.used, recipe.token_std)
        self.full_embedding, clip.token_embedding = clip.token_embedding, self.table

    def loss(self, images, labels, rng):
        which = (torch.as_tensor(rng.random(len(labels))) * self.counts[labels]).long()
        keys = torch.unique(labels * self.tokens.shape[1] + which)  # each caption once
        owner = keys // self.tokens.shape[1]  # the character each caption names
        text = self.net.encode_text(self.tokens[owner, keys % self.tokens.shape[1]],
                                    normalize=True)
        image = self.net.encode_image(images, normalize=True)
        logits = self.net.logit_scale.exp() * image @ text.T  # (images, distinct captions)
        same = (labels[:, None] == owner[None, :]).float()
        loss = (F.cross_entropy(logits, same / same.sum(1, keepdim=True))
                + F.cross_entropy(logits.T, (same / same.sum(0, keepdim=True)).T)) / 2
        acc = same[torch.arange(len(labels)), logits.argmax(1)].mean()
        return loss, acc

    def scores(self, images):
        text = self.net.encode_text(self.prompts, normalize=True)
        return self.net.encode_image(images, normalize=True) @ text.T

    def after_step(self) -> None:
        """Keep the logit scale at most 100, as CLIP does."""
        with torch.no_grad():
            self.net.logit_scale.clamp_(0, math.log(100))

    def state_dict(self):
        with torch.no_grad():
            self.full_embedding.weight[self.used] = self.table.weight
        self.net.token_embedding = self.full_embedding
        try:
            return {k: v.clone() for k, v in self.net.state_dict().items()}
        finally:
            self.net.token_embedding = self.table


class _UsedTokens(nn.Module):
    """An embedding over a subset of the vocabulary, looked up by full token ids."""

    def __init__(self, full: nn.Embedding, used: torch.Tensor, std: float):
        super().__init__()
        index = torch.full((full.num_embeddings,), -1, dtype=torch.long)
        index[used] = torch.arange(len(used))
        self.register_buffer("index", index, persistent=False)
        self.weight = nn.Parameter(torch.randn(len(used), full.embedding_dim) * std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(self.index[ids], self.weight)


def _preprocess(size: int, mean, std, interpolation: str) -> nn.Module:
    return Preprocess(size, mean, std, interpolation)


OBJECTIVES: dict[str, type[Objective]] = {"timm": Supervised, "open_clip": Contrastive}

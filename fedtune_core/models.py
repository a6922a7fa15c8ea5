"""Backbones (CLIP via open_clip, ViT via timm) and the classifier around them.

One factory: a backbone name maps to a :class:`BackboneSpec` (data), whose ``family``
picks one of two builders. The offline tiny variants are specs like the others and go
through the same builders: ``clip-tiny`` is an open_clip JSON model config shipped with
the package, ``vit-tiny`` a set of timm kwargs.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedtune_core.errors import ConfigError, check_choice

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
CLIP_PROMPT = "a photo of a {}."


@dataclass(frozen=True)
class BackboneSpec:
    """A named backbone: which library builds it, from which architecture, with which weights."""

    family: str  # "open_clip" or "timm"
    arch: str  # open_clip model name or timm model name
    pretrained: str | None  # hub tag used by weights="auto"; None: no pre-trained weights exist
    kwargs: dict[str, Any] = field(default_factory=dict)  # architecture overrides (timm)


BACKBONES: dict[str, BackboneSpec] = {
    "clip-vit-b32": BackboneSpec("open_clip", "ViT-B-32", "openai"),
    "clip-vit-b16": BackboneSpec("open_clip", "ViT-B-16", "openai"),
    "vit-b16": BackboneSpec("timm", "vit_base_patch16_224", "augreg_in21k"),
    "vit-b32": BackboneSpec("timm", "vit_base_patch32_224", "augreg_in21k"),
    "clip-tiny": BackboneSpec("open_clip", "fedtune-clip-tiny", None),
    "vit-tiny": BackboneSpec("timm", "vit_tiny_patch16_224", None,
                             dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)),
}


class Classifier(nn.Module):
    """An image encoder and a linear head: ``logits = head(encoder(x))``.

    Attributes:
        encoder: the image tower (timm ViT without its head, or open_clip's visual tower).
        head: ``nn.Linear(width_out, classes)``; always trained.
        blocks_path: where the transformer blocks live inside ``encoder``.
        width: the token width inside the blocks (what prompts and adapters are sized by).
        prefix_tokens: tokens before the patch tokens (class token, registers).
        normalize: L2-normalise features before the head (CLIP's cosine classifier).
        input_size, mean, std, interpolation: the model's own preprocessing.
    """

    def __init__(self, encoder: nn.Module, head: nn.Linear, *, blocks_path: str, width: int,
                 prefix_tokens: int, normalize: bool, input_size: int, mean: Sequence[float],
                 std: Sequence[float], interpolation: str = "bicubic"):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.blocks_path = blocks_path
        self.width = width
        self.prefix_tokens = prefix_tokens
        self.normalize = normalize
        self.input_size = input_size
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.interpolation = interpolation

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, each with ``.attn`` and ``.mlp``."""
        return self.encoder.get_submodule(self.blocks_path)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Image features fed to the head."""
        feats = self.encoder(x)
        return F.normalize(feats, dim=-1) if self.normalize else feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def check_weights(model: str, weights: str) -> None:
    """Validate a weights value without touching the network."""
    check_choice("model", model, BACKBONES)
    spec = BACKBONES[model]
    if weights in ("auto", "none"):
        return
    if _looks_like_path(weights):
        if not Path(weights).is_file():
            raise ConfigError(f"checkpoint file {weights!r} does not exist; pass --weights with "
                              "an existing local checkpoint file, a hub tag, auto or none")
        return
    tags = hub_tags(spec)
    check_choice(f"hub tag for {model}", weights, tags + ["auto", "none", "a checkpoint file"])


def hub_tags(spec: BackboneSpec) -> list[str]:
    """The pre-trained tags the library knows for this architecture (no download)."""
    if spec.family == "open_clip":
        import open_clip

        return list(open_clip.list_pretrained_tags_by_model(spec.arch))
    import timm

    return [n.split(".", 1)[1] for n in timm.list_pretrained(f"{spec.arch}.*")]


def _looks_like_path(weights: str) -> bool:
    return os.sep in weights or weights.endswith(CHECKPOINT_SUFFIXES) or Path(weights).exists()


def resolve_weights(model: str, weights: str) -> tuple[str, str | None]:
    """Turn a weights value into ``(kind, source)``: ('none', None), ('file', path), ('hub', tag).

    ``auto`` takes ``$FEDTUNE_WEIGHTS_DIR/<model>.<suffix>`` if such a file exists, else
    the backbone's hub tag, else (tiny variants) no weights.
    """
    check_weights(model, weights)
    spec = BACKBONES[model]
    if weights == "auto":
        folder = os.environ.get("FEDTUNE_WEIGHTS_DIR")
        for suffix in CHECKPOINT_SUFFIXES if folder else ():
            path = Path(folder, model + suffix)
            if path.is_file():
                return "file", str(path)
        return ("hub", spec.pretrained) if spec.pretrained else ("none", None)
    if weights == "none":
        return "none", None
    if _looks_like_path(weights):
        return "file", weights
    return "hub", weights


def _weights_error(model: str, kind: str, source: str, err: Exception) -> ConfigError:
    if kind == "file":
        return ConfigError(f"cannot read checkpoint file {source!r} for {model}: "
                           f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    return ConfigError(
        f"could not get pre-trained weights {source!r} for {model} (no internet?): "
        f"{type(err).__name__}; download them where there is internet and pass "
        f"--weights /path/to/checkpoint, or put the file at $FEDTUNE_WEIGHTS_DIR/{model}.pt")


def build(model: str, class_names: Sequence[str], weights: str = "auto",
          text_head: bool = True) -> Classifier:
    """Build the classifier for ``class_names`` on backbone ``model``.

    Args:
        model: a name in :data:`BACKBONES`.
        class_names: the dataset's classes, in label order (CLIP's head is built from them).
        weights: ``auto``, ``none``, a hub tag, or a local checkpoint file.
        text_head: CLIP only: initialise the head from the text embeddings of the class
            prompts (zero-shot head). False leaves a random head (parameter counting).

    Raises:
        ConfigError: unknown model, bad weights value, or weights that cannot be loaded.
    """
    kind, source = resolve_weights(model, weights)
    spec = BACKBONES[model]
    builder = _BUILDERS[spec.family]
    try:
        return builder(spec, list(class_names), kind, source, text_head)
    except ConfigError:
        raise
    except Exception as err:
        if kind == "none":
            raise
        raise _weights_error(model, kind, source, err) from err


def _build_timm(spec: BackboneSpec, class_names: list[str], kind: str, source: str | None,
                text_head: bool) -> Classifier:
    import timm

    name = f"{spec.arch}.{source}" if kind == "hub" else spec.arch
    extra = {"pretrained_cfg_overlay": {"file": source}} if kind == "file" else {}
    net = timm.create_model(name, pretrained=kind != "none", num_classes=len(class_names),
                            **spec.kwargs, **extra)
    head, net.head = net.head, nn.Identity()
    cfg = timm.data.resolve_model_data_config(net)
    return Classifier(net, head, blocks_path="blocks", width=net.embed_dim,
                      prefix_tokens=net.num_prefix_tokens, normalize=False,
                      input_size=net.patch_embed.img_size[-1], mean=cfg["mean"], std=cfg["std"],
                      interpolation=cfg["interpolation"])


def _build_open_clip(spec: BackboneSpec, class_names: list[str], kind: str, source: str | None,
                     text_head: bool) -> Classifier:
    import open_clip

    # OpenAI's weights were trained with QuickGELU; the tag's config says so. A checkpoint
    # file or random init follows the backbone's own tag (openai for clip-vit-b32).
    tag = source if kind == "hub" else spec.pretrained
    quick = bool(tag and open_clip.get_pretrained_cfg(spec.arch, tag).get("quick_gelu"))
    with _quiet_root_logger(kind == "none"):  # open_clip warns that random init is random
        clip = open_clip.create_model(spec.arch, pretrained=source if kind != "none" else None,
                                      force_quick_gelu=quick)
    clip.eval()
    visual = clip.visual
    head = nn.Linear(visual.output_dim, len(class_names))
    if text_head:
        tokenizer = open_clip.get_tokenizer(spec.arch)
        prompts = tokenizer([CLIP_PROMPT.format(c) for c in class_names])
        with torch.no_grad():
            text = F.normalize(clip.encode_text(prompts), dim=-1)
            head.weight.copy_(text * clip.logit_scale.exp())
            head.bias.zero_()
    pre = visual.preprocess_cfg
    size = pre["size"] if isinstance(pre["size"], int) else pre["size"][-1]
    del clip  # the text tower ran once; it never trains or travels
    return Classifier(visual, head, blocks_path="transformer.resblocks",
                      width=visual.transformer.width, prefix_tokens=1, normalize=True,
                      input_size=size, mean=pre["mean"], std=pre["std"],
                      interpolation=pre.get("interpolation", "bicubic"))


@contextlib.contextmanager
def _quiet_root_logger(quiet: bool):
    root = logging.getLogger()
    level = root.level
    if quiet:
        root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


_BUILDERS = {"open_clip": _build_open_clip, "timm": _build_timm}


def _register_configs() -> None:
    import open_clip

    open_clip.add_model_config(Path(__file__).parent / "model_configs")


_register_configs()

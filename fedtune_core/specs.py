"""Backbone specs as plain data, what a weights value and a partition mean: no torch.

A backbone name maps to a :class:`BackboneSpec` (which library builds it, from which
architecture, with which weights by default). This module imports no heavy library, so
the CLI checks a model name or a weights value in milliseconds; :mod:`fedtune_core.fl.models`
builds the networks.
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune_core.errors import ConfigError, check_choice, check_range

PARTITION_KINDS = ("iid", "dirichlet", "shards", "fewshot")
PARTITION_FORMS = "iid, dirichlet:ALPHA, shards:K, fewshot:K"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


@dataclass(frozen=True)
class BackboneSpec:
    """A named backbone: which library builds it, from which architecture, with which weights."""

    family: str  # "open_clip" or "timm"
    arch: str  # open_clip model name or timm model name
    pretrained: str | None  # hub tag used by weights="auto"; None: no pre-trained weights exist
    kwargs: dict[str, Any] = field(default_factory=dict)  # architecture overrides (timm)
    # fedtune's own pre-training recipes (fedtune_core.recipes), weakest first; without a
    # hub tag, weights="auto" takes the last
    recipes: tuple[str, ...] = ()


BACKBONES: dict[str, BackboneSpec] = {
    "clip-vit-b32": BackboneSpec("open_clip", "ViT-B-32", "openai"),
    "clip-vit-b16": BackboneSpec("open_clip", "ViT-B-16", "openai"),
    "vit-b16": BackboneSpec("timm", "vit_base_patch16_224", "augreg_in21k"),
    "vit-b32": BackboneSpec("timm", "vit_base_patch32_224", "augreg_in21k"),
    "clip-tiny": BackboneSpec("open_clip", "fedtune-clip-tiny", None,
                              recipes=("glyphs-weak", "glyphs-strong")),
    "vit-tiny": BackboneSpec("timm", "vit_tiny_patch16_224", None,
                             dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2),
                             recipes=("glyphs-weak", "glyphs-strong")),
}


def split_id(weights: str) -> tuple[str, str | None]:
    """``glyphs-strong@<hash>`` -> ``("glyphs-strong", "<hash>")``; without ``@``, the value
    and None. The one parse of a weights value's name (records write ``<recipe>@<hash>``)."""
    name, _, digest = weights.partition("@")
    return name, digest or None


def check_weights(model: str, weights: str) -> None:
    """Validate a weights value without touching the network.

    Only a hub tag (neither auto, none, a recipe nor a file) imports the backbone's
    library, to list the tags it knows. A recipe may carry its hash (``glyphs-strong@<hash>``,
    as run records write it); :func:`fedtune_core.recipes.check_run_weights` checks it.
    """
    check_choice("model", model, BACKBONES)
    if not isinstance(weights, str) or not weights:
        raise ConfigError(f"weights must be auto, none, a hub tag or a checkpoint file, "
                          f"got {weights!r}")
    spec = BACKBONES[model]
    if weights in ("auto", "none") or split_id(weights)[0] in spec.recipes:
        return
    if _looks_like_path(weights):
        if not Path(weights).is_file():
            raise ConfigError(f"checkpoint file {weights!r} does not exist; pass --weights with "
                              "an existing local checkpoint file, a hub tag, auto or none")
        return
    tags = hub_tags(spec)
    check_choice(f"weights for {model}", weights,
                 [*spec.recipes, *tags, "auto", "none", "a checkpoint file"])


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
    """Turn a weights value into ``(kind, source)``: ('none', None), ('file', path),
    ('hub', tag) or ('recipe', name): fedtune's own pre-training (fedtune_core.proxy.pretrain).

    ``auto`` takes ``$FEDTUNE_WEIGHTS_DIR/<model>.<suffix>`` if such a file exists, else
    the backbone's hub tag, else (tiny variants) its strongest recipe.
    """
    check_weights(model, weights)
    spec = BACKBONES[model]
    if weights == "auto":
        folder = os.environ.get("FEDTUNE_WEIGHTS_DIR")
        for suffix in CHECKPOINT_SUFFIXES if folder else ():
            path = Path(folder, model + suffix)
            if path.is_file():
                return "file", str(path)
        if spec.pretrained:
            return "hub", spec.pretrained
        return ("recipe", spec.recipes[-1]) if spec.recipes else ("none", None)
    if weights == "none":
        return "none", None
    if (name := split_id(weights)[0]) in spec.recipes:
        return "recipe", name
    if _looks_like_path(weights):
        return "file", weights
    return "hub", weights


def is_torchscript(path: str | os.PathLike) -> bool:
    """True for a TorchScript archive: the format of OpenAI's own CLIP checkpoint files."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def check_quick_gelu(model: str, weights: str, requested: bool | None) -> None:
    """Validate ``quick_gelu`` without importing torch unless it is set for hub weights.

    Raises:
        ConfigError: not true/false/unset, set for a timm backbone, or contradicting the
            weights (see :func:`resolve_quick_gelu`).
    """
    if requested is not None and not isinstance(requested, bool):
        raise ConfigError(f"quick_gelu must be true, false or unset (auto), got {requested!r}")
    if requested is not None:
        resolve_quick_gelu(model, weights, requested)


def resolve_quick_gelu(model: str, weights: str, requested: bool | None = None,
                       ) -> tuple[bool | None, str]:
    """Whether a CLIP backbone runs QuickGELU, and why; ``(None, ...)`` for timm backbones.

    A hub tag says which activation its weights were trained with (open_clip's pretrained
    config); a TorchScript archive is OpenAI's release format, trained with QuickGELU. A
    plain state dict does not say: ``requested`` decides, else the backbone's own tag
    (OpenAI for ``clip-vit-*``: QuickGELU), an assumption the reason names.

    Raises:
        ConfigError: ``requested`` for a timm backbone, or contradicting the weights.
    """
    spec = BACKBONES[model]
    if spec.family != "open_clip":
        if requested is not None:
            raise ConfigError(f"quick_gelu applies to CLIP backbones only, not {model}; "
                              "leave it unset")
        return None, "not a CLIP backbone"
    kind, source = resolve_weights(model, weights)
    if kind == "hub":
        known, origin = _tag_quick_gelu(spec, source), f"the {source!r} weights"
    elif kind == "file" and is_torchscript(source):
        known, origin = True, "an OpenAI TorchScript archive"
    elif requested is not None:
        return requested, "set in the config"
    else:
        default = _tag_quick_gelu(spec, spec.pretrained)
        what = f"{spec.pretrained!r} weights" if spec.pretrained else "architecture"
        return default, (f"assumed from {model}'s {what}" if kind == "file"
                         else f"{model}'s {what}")
    if requested is not None and requested != known:
        act = "QuickGELU" if known else "GELU"
        raise ConfigError(f"quick_gelu={requested} contradicts {origin} for {model}, trained "
                          f"with {act}; set quick_gelu to {known} or leave it unset")
    return known, origin


def _tag_quick_gelu(spec: BackboneSpec, tag: str | None) -> bool:
    """Whether open_clip's config of pre-trained ``tag`` asks for QuickGELU (imports it)."""
    if not tag:
        return False
    import open_clip

    return bool(open_clip.get_pretrained_cfg(spec.arch, tag).get("quick_gelu"))


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed partition: its kind and its parameter (alpha, K, or None for iid)."""

    kind: str
    value: float | int | None = None

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value}"


def parse_partition(spec: str) -> PartitionSpec:
    """Parse a partition string such as ``"dirichlet:0.5"``.

    Args:
        spec: One of ``iid``, ``dirichlet:ALPHA``, ``shards:K``, ``fewshot:K``.

    Raises:
        ConfigError: On an unknown kind, a missing, extra or bad value (alpha <= 0, K < 1).
    """
    kind, sep, arg = str(spec).strip().partition(":")
    if kind not in PARTITION_KINDS or (kind == "iid") == bool(sep) or (sep and not arg.strip()):
        problem = "unknown partition" if kind not in PARTITION_KINDS else "malformed partition"
        raise ConfigError(f"{problem} {spec!r}; valid choices: {PARTITION_FORMS}")
    if kind == "iid":
        return PartitionSpec("iid")
    try:
        value = float(arg) if kind == "dirichlet" else int(arg)
    except ValueError:
        raise ConfigError(f"malformed partition {spec!r}; valid choices: "
                          f"{PARTITION_FORMS}") from None
    if kind != "dirichlet":
        check_range(f"{kind} K", value, low=1)
    else:
        check_range("dirichlet alpha", value, low=0, low_open=True)
        if not math.isfinite(value):  # nan and inf pass the range check
            raise ConfigError(f"dirichlet alpha must be a finite number > 0, got {value!r}")
    return PartitionSpec(kind, value)

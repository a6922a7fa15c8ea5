"""Backbones (CLIP via open_clip, ViT via timm) and the classifier around them.

One factory: a backbone name maps to a :class:`BackboneSpec` (data), whose ``family``
picks one of two builders. The offline tiny variants are specs like the others and go
through the same builders: ``clip-tiny`` is an open_clip JSON model config shipped with
the package, ``vit-tiny`` a set of timm kwargs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fedtune_core.errors import ConfigError
from fedtune_core.fl import weights as wts
from fedtune_core.specs import (  # noqa: F401  (re-exported: models.BACKBONES etc.)
    BACKBONES,
    CHECKPOINT_SUFFIXES,
    BackboneSpec,
    check_weights,
    hub_tags,
    is_torchscript,
    resolve_quick_gelu,
    resolve_weights,
)

CLIP_PROMPT = "a photo of a {}."


class Classifier(nn.Module):
    """An image encoder and a linear head: ``logits = head(encoder(x))``.

    Attributes:
        encoder: the image tower (timm ViT without its head, or open_clip's visual tower).
        head: ``nn.Linear(width_out, classes)``; always trained.
        blocks_path: where the transformer blocks live inside ``encoder``.
        width: the token width inside the blocks (what prompts and adapters are sized by).
        prefix_tokens: tokens before the patch tokens (class token, registers).
        normalize: L2-normalise features before the head (CLIP's cosine classifier).
        feature_scale: with ``normalize``, the features' norm (CLIP: its logit scale).
        input_size, mean, std, interpolation: the model's own preprocessing.
    """

    def __init__(self, encoder: nn.Module, head: nn.Linear, *, blocks_path: str, width: int,
                 prefix_tokens: int, normalize: bool, input_size: int, mean: Sequence[float],
                 std: Sequence[float], interpolation: str = "bicubic",
                 feature_scale: float = 1.0):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.blocks_path = blocks_path
        self.width = width
        self.prefix_tokens = prefix_tokens
        self.normalize = normalize
        self.feature_scale = feature_scale
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
        return F.normalize(feats, dim=-1) * self.feature_scale if self.normalize else feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _weights_error(model: str, kind: str, source: str, err: Exception) -> ConfigError:
    if kind == "file":
        return ConfigError(f"cannot read checkpoint file {source!r} for {model}: "
                           f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    return wts.hub_error(model, source, err)


def build(model: str, class_names: Sequence[str], weights: str = "auto",
          text_head: bool = True, quick_gelu: bool | None = None) -> Classifier:
    """Build the classifier for ``class_names`` on backbone ``model``.

    CLIP's head is CLIP's own similarity, ``logits = s * cos(image, class)``: features are
    the image embedding normalised to norm ``s`` (the checkpoint's logit scale, 100 for
    OpenAI's) and the head's rows start as the unit text embeddings of "a photo of a
    {class}." (bias 0), so before training the classifier is CLIP's zero-shot classifier.
    Putting ``s`` on the features rather than on the rows (``s * t``, unit features) gives
    the same logits but a head that learns at the rates that suit ViT's (see
    docs/protocol.md and benchmarks/clip_head.py). ViT's head is timm's, for the classes.

    Args:
        model: a name in :data:`BACKBONES`.
        class_names: the dataset's classes, in label order (CLIP's head is built from them).
        weights: ``auto``, ``none``, a hub tag, or a local checkpoint file. Recipe weights
            (the tiny models' ``auto``) are first resolved to their checkpoint file by
            :func:`fedtune_core.proxy.pretrain.weights_file`.
        text_head: CLIP only: initialise the head from the text embeddings of the class
            prompts (zero-shot head). False leaves a random head (parameter counting).
        quick_gelu: CLIP only: True/False forces the activation; None (auto) follows the
            weights (see :func:`resolve_quick_gelu`).

    Raises:
        ConfigError: unknown model, bad weights value, or weights that cannot be loaded.
    """
    kind, source = resolve_weights(model, weights)
    if kind == "recipe":
        raise ConfigError(f"weights {source!r} of {model} are fedtune's own pre-training: "
                          "resolve them with fedtune_core.proxy.pretrain.weights_file (runs "
                          "do), or pass the checkpoint file that `fedtune pretrain --model "
                          f"{model} --recipe {source}` prints")
    quick, _ = resolve_quick_gelu(model, weights, quick_gelu)  # a contradiction stops here
    spec = BACKBONES[model]
    builder = _BUILDERS[spec.family]
    if kind == "hub":
        wts.prepare_hub()  # one probe; offline: the local cache or an error at once
    try:
        return builder(spec, list(class_names), kind, source, text_head, quick)
    except ConfigError:
        raise
    except Exception as err:
        if kind == "none":
            raise
        raise _weights_error(model, kind, source, err) from err


def _build_timm(spec: BackboneSpec, class_names: list[str], kind: str, source: str | None,
                text_head: bool, quick_gelu: bool | None) -> Classifier:
    import timm

    name = f"{spec.arch}.{source}" if kind == "hub" else spec.arch
    net = timm.create_model(name, pretrained=kind == "hub", num_classes=len(class_names),
                            **spec.kwargs)
    if kind == "file":  # strict: only the classifier (for other classes) is replaced
        wts.load_file(net, source, model=_name_of(spec), replaced=(_classifier(net) + ".",),
                      convert=wts.library_filter(net))
    head, net.head = net.head, nn.Identity()
    cfg = timm.data.resolve_model_data_config(net)
    return Classifier(net, head, blocks_path="blocks", width=net.embed_dim,
                      prefix_tokens=net.num_prefix_tokens, normalize=False,
                      input_size=net.patch_embed.img_size[-1], mean=cfg["mean"], std=cfg["std"],
                      interpolation=cfg["interpolation"])


def _build_open_clip(spec: BackboneSpec, class_names: list[str], kind: str, source: str | None,
                     text_head: bool, quick_gelu: bool) -> Classifier:
    import open_clip

    register_configs()
    # The activation: from the weights or the config (specs.resolve_quick_gelu).
    with quiet_root_logger(True):  # random init warns; a failed download is re-raised, named
        clip = open_clip.create_model(spec.arch, pretrained=source if kind == "hub" else None,
                                      force_quick_gelu=quick_gelu,
                                      device=torch.get_default_device())  # meta: no weights
    if uses_quick_gelu(clip.visual) != quick_gelu:
        raise ConfigError(f"open_clip's {spec.arch} config fixes its activation; "
                          f"quick_gelu={quick_gelu} cannot be honoured")
    if kind == "file":  # the full model, strictly (the text tower builds the head); a
        wts.load_file(clip, source, model=_name_of(spec))  # TorchScript archive (OpenAI's) too
    clip.eval()
    visual = clip.visual
    head = nn.Linear(visual.output_dim, len(class_names))
    if text_head:  # CLIP's own similarity: logit scale x cos(image, class text); see docstring
        tokenizer = open_clip.get_tokenizer(spec.arch)
        prompts = tokenizer([CLIP_PROMPT.format(c) for c in class_names])
        with torch.no_grad():
            head.weight.copy_(F.normalize(clip.encode_text(prompts), dim=-1))
            head.bias.zero_()
    pre = visual.preprocess_cfg
    size = pre["size"] if isinstance(pre["size"], int) else pre["size"][-1]
    scale = 1.0 if clip.logit_scale.is_meta else clip.logit_scale.exp().item()
    del clip  # the text tower ran once; it never trains or travels
    return Classifier(visual, head, blocks_path="transformer.resblocks",
                      width=visual.transformer.width, prefix_tokens=1, normalize=True,
                      input_size=size, mean=pre["mean"], std=pre["std"],
                      interpolation=pre.get("interpolation", "bicubic"), feature_scale=scale)


def _classifier(net: nn.Module) -> str:
    """The name of a timm model's classifier module (``head`` for ViT)."""
    return net.pretrained_cfg.get("classifier") or "head"


def _name_of(spec: BackboneSpec) -> str:
    """The backbone name of ``spec``."""
    return next(name for name, s in BACKBONES.items() if s is spec)


def uses_quick_gelu(module: nn.Module) -> bool:
    """True if any activation inside ``module`` is open_clip's QuickGELU."""
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in module.modules())


@contextlib.contextmanager
def quiet_root_logger(quiet: bool):
    """Silence the root logger while the block runs (if ``quiet``)."""
    root = logging.getLogger()
    level = root.level
    if quiet:
        root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.setLevel(level)


_BUILDERS = {"open_clip": _build_open_clip, "timm": _build_timm}


@functools.cache
def register_configs() -> None:
    """Make our open_clip JSON model configs (``clip-tiny``) known to open_clip; once, on
    first use (not at import: importing fedtune changes no library's state)."""
    import open_clip

    open_clip.add_model_config(Path(__file__).parents[1] / "model_configs")

"""Datasets held in memory as uint8 tensors, and the model's preprocessing as a batch op.

Images stay ``uint8 (N, 3, H, W)`` on the device; each batch is resized to the model's
input size and normalised with its mean/std there (:class:`Preprocess`). No per-image
PIL pipeline runs in the training loop.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedtune_core.checks import DATASETS, check_dataset  # noqa: F401  (data.check_dataset)
from fedtune_core.errors import ConfigError

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLIT_SEED = 0  # the train/test split of datasets without one is fixed, whatever the run seed


@dataclass
class Split:
    """Images (uint8, N x 3 x H x W) and labels (int64, N).

    In a trainer's feature view (:func:`fedtune_core.fl.features.encode`) ``images``
    holds the encoder's features instead (float32, N x width).
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> Split:
        """The same split on ``device``."""
        return Split(self.images.to(device), self.labels.to(device))

    def subset(self, index: np.ndarray) -> Split:
        idx = torch.as_tensor(index, dtype=torch.long)
        return Split(self.images[idx], self.labels[idx])


@dataclass
class Dataset:
    """A training pool (split among clients), a held-out global test set, class names."""

    name: str
    train: Split
    test: Split
    class_names: list[str]


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Where downloadable datasets live: explicit, else $FEDTUNE_DATA_DIR, else ./data."""
    return Path(explicit or os.environ.get("FEDTUNE_DATA_DIR") or "data")


def load(name: str, root: str | os.PathLike | None = None, image_size: int = 224) -> Dataset:
    """Load dataset ``name`` into memory.

    Args:
        name: one of :data:`DATASETS`.
        root: folder for downloaded datasets (see :func:`data_dir`).
        image_size: imagefolder only: images are resized and centre-cropped to this size.
    """
    check_dataset(name)
    if name.startswith("imagefolder:"):
        return _imagefolder(name.split(":", 1)[1], image_size)
    return _LOADERS[name](data_dir(root))


def _to_split(images: np.ndarray, labels: np.ndarray) -> Split:
    return Split(torch.as_tensor(images, dtype=torch.uint8).contiguous(),
                 torch.as_tensor(labels, dtype=torch.long))


def _holdout(labels: np.ndarray, fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test indices with the fixed split seed."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=fraction, stratify=labels,
                                   random_state=SPLIT_SEED)
    return np.sort(train), np.sort(test)


def _digits(root: Path) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)  # 8x8, 0..16
    images = np.repeat(images[:, None], 3, axis=1)
    labels = bunch.target.astype(np.int64)
    train, test = _holdout(labels)
    return Dataset("digits", _to_split(images[train], labels[train]),
                   _to_split(images[test], labels[test]), list(DIGIT_NAMES))


def _cifar(name: str, root: Path) -> Dataset:
    from torchvision import datasets

    from fedtune_core.fl import standin

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    cls = standin.loader_class(cls, root)  # a rehearsal's stand-in: its own checksums
    existed = root.exists()
    try:
        parts = [cls(str(root), train=t, download=True) for t in (True, False)]
    except Exception as err:  # offline: torchvision cannot fetch the archive
        if not existed:  # nothing half-made behind: the folder torchvision created, and
            shutil.rmtree(root, ignore_errors=True)  # any partial download in it
        raise ConfigError(
            f"could not load {name} from {str(root)!r} ({type(err).__name__}); on a machine "
            f"without internet put torchvision's extracted {name} folder there, or point "
            "--data-dir / $FEDTUNE_DATA_DIR at it") from err
    train, test = (_to_split(p.data.transpose(0, 3, 1, 2), np.asarray(p.targets)) for p in parts)
    return Dataset(name, train, test, list(parts[0].classes))


def _synthetic(root: Path, classes: int = 10, train: int = 2000, test: int = 500) -> Dataset:
    """Random 32x32 images whose colour depends on the class: for speed tests, not results."""
    rng = np.random.default_rng(SPLIT_SEED)
    labels = rng.integers(0, classes, train + test)
    colours = rng.integers(0, 256, (classes, 3, 1, 1))
    noise = rng.integers(-64, 64, (train + test, 3, 32, 32))
    images = np.clip(colours[labels] + noise, 0, 255).astype(np.uint8)
    names = [f"class {c}" for c in range(classes)]
    return Dataset("synthetic", _to_split(images[:train], labels[:train]),
                   _to_split(images[train:], labels[train:]), names)


def _imagefolder(path: str, image_size: int) -> Dataset:
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size),
                             transforms.PILToTensor()])
    root = Path(path)
    if (root / "train").is_dir() and (root / "test").is_dir():
        parts = [datasets.ImageFolder(str(root / s), transform=tf, loader=decode_image)
                 for s in ("train", "test")]
        tensors = [_stack(p) for p in parts]
        if parts[0].classes != parts[1].classes:
            raise ConfigError(f"imagefolder {path!r}: train/ and test/ hold different classes")
        return Dataset(f"imagefolder:{path}", *tensors, list(parts[0].classes))
    folder = datasets.ImageFolder(str(root), transform=tf, loader=decode_image)
    whole = _stack(folder)
    train, test = _holdout(whole.labels.numpy())
    return Dataset(f"imagefolder:{path}", whole.subset(train), whole.subset(test),
                   list(folder.classes))


def _stack(folder) -> Split:
    images = torch.stack([_read(folder, i).expand(3, -1, -1) for i in range(len(folder))])
    return Split(images, torch.as_tensor(folder.targets, dtype=torch.long))


def _read(folder, index: int) -> torch.Tensor:
    """Image ``index`` of an ImageFolder; an unreadable one is bad input, named."""
    try:
        return folder[index][0]
    except ConfigError:
        raise
    except Exception as err:  # PIL raises many types for broken or foreign files
        raise ConfigError(f"imagefolder image {folder.samples[index][0]!r} cannot be read "
                          f"({type(err).__name__}); remove it or replace it with a valid "
                          "image") from None


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def decode_image(path: str):
    """An image file as an 8-bit RGB PIL image, by one defined conversion per kind.

    16-bit (and 32-bit integer) grey is scaled from 0..65535 to 0..255; palettes become
    their colours; an alpha channel (or a palette's transparency) is flattened onto black
    (each colour times its opacity); CMYK, YCbCr and the other colour modes are converted
    by PIL. Anything else (float images, integers outside 0..65535) is refused in one
    line, never clipped to a few grey levels.

    Raises:
        ConfigError: an image no conversion is defined for.
    """
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return _to_rgb8(img, path)


def _to_rgb8(img, path: str):
    from PIL import Image

    if img.mode in _SIXTEEN_BIT:
        grey = np.asarray(img).astype(np.int64)
        if grey.size and (grey.min() < 0 or grey.max() > 65535):
            raise ConfigError(f"imagefolder image {path!r} has {img.mode} values outside "
                              "0..65535; give 8- or 16-bit images")
        grey = np.round(grey * (255 / 65535)).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode == "P" or img.mode == "PA" or "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("LA", "La", "RGBA", "RGBa"):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float64)
        rgb = rgba[..., :3] * (rgba[..., 3:] / 255.0)
        return Image.fromarray(np.round(rgb).astype(np.uint8), "RGB")
    if img.mode in ("1", "L", "RGB", "CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB")
    raise ConfigError(f"imagefolder image {path!r} has pixel mode {img.mode!r}, which is not "
                      "read; give 8- or 16-bit grey, RGB, palette, alpha or CMYK images")


def _fashion(root: Path) -> Dataset:
    from fedtune_core.fl import fashion

    parts, names = fashion.load(root)
    return Dataset("fashion-mnist", _to_split(*parts["train"]), _to_split(*parts["test"]), names)


_LOADERS = {
    "digits": _digits,
    "fashion-mnist": _fashion,
    "cifar10": lambda root: _cifar("cifar10", root),
    "cifar100": lambda root: _cifar("cifar100", root),
    "synthetic": _synthetic,
}


class Preprocess(nn.Module):
    """uint8 batch -> float, resized to the model's input size, normalised by its mean/std.

    ``interpolation`` is the model's own (bicubic for CLIP and ViT), antialiased when
    shrinking. Bicubic resampling overshoots at edges (upsampled to 224, 31% of the pixels
    of 8x8 digits and 6% of those of noisy 32x32 images leave 0..255), so the resized batch
    is clamped back to 0..255 before normalising, as PIL's resize does for uint8 images.
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float],
                 interpolation: str = "bicubic"):
        super().__init__()
        self.size = size
        self.mode = "bicubic" if interpolation == "bicubic" else "bilinear"
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode=self.mode,
                              align_corners=False, antialias=x.shape[-1] > self.size)
            x = x.clamp(0.0, 255.0)
        return (x - self.mean) / self.std

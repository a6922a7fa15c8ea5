"""Fashion-MNIST (Xiao et al. 2017, MIT licence): 28x28 grey clothing images, 10 classes.

Read from torchvision's raw IDX layout (``<data dir>/FashionMNIST/raw/``, uncompressed or
``.gz``), else from Debian's ``dataset-fashion-mnist`` package (:data:`DEBIAN`), else
downloaded by torchvision into the data dir. The study uses a class-balanced subsample of
digits' size (:data:`TRAIN_PER_CLASS` and :data:`TEST_PER_CLASS` images of each class from
the official 60,000 / 10,000 split), drawn with a fixed seed, never by results, so that the
demo's grid on it runs in about the demo's time.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np

from fedtune_core.errors import ConfigError

DEBIAN = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
TRAIN_PER_CLASS, TEST_PER_CLASS = 144, 36  # 1,440 / 360 images: digits' 1,437 / 360
SUBSAMPLE_SEED = 0
# torchvision.datasets.FashionMNIST.classes, as plain words for CLIP's text head
CLASS_NAMES = ["t-shirt or top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
               "sneaker", "bag", "ankle boot"]


def folder(root: Path) -> Path:
    """The first folder holding all four IDX files: torchvision's layout, then Debian's;
    else torchvision downloads them under ``root`` (offline: one clear error)."""
    for where in (root / "FashionMNIST" / "raw", DEBIAN):
        if all(_file(where, name) for names in FILES.values() for name in names):
            return where
    return _download(root)


def _file(where: Path, name: str) -> Path | None:
    for path in (where / name, where / f"{name}.gz"):
        if path.is_file():
            return path
    return None


def _download(root: Path) -> Path:
    from torchvision import datasets

    existed = root.exists()
    try:
        datasets.FashionMNIST(str(root), train=True, download=True)
    except Exception as err:  # offline: torchvision cannot fetch the archives
        if not existed:
            shutil.rmtree(root, ignore_errors=True)
        raise ConfigError(
            f"could not load fashion-mnist from {str(root)!r} or {str(DEBIAN)!r} "
            f"({type(err).__name__}); offline, install Debian's dataset-fashion-mnist package "
            "or put torchvision's FashionMNIST/raw folder under --data-dir / "
            "$FEDTUNE_DATA_DIR") from err
    return root / "FashionMNIST" / "raw"


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (plain or gzipped) as a uint8 array of its shape.

    Raises:
        ConfigError: a file that is not an unsigned-byte IDX file of the size it declares.
    """
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ConfigError(f"{path} is not an IDX file of unsigned bytes (bad header); "
                          "replace it with the original Fashion-MNIST file")
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    body = np.frombuffer(raw, np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise ConfigError(f"{path} holds {body.size} bytes of data, its header declares "
                          f"{shape}; replace it with the original Fashion-MNIST file")
    return body.reshape(shape)


def balanced(labels: np.ndarray, per_class: int, seed: int = SUBSAMPLE_SEED) -> np.ndarray:
    """Sorted indices of ``per_class`` images of each class, drawn with a fixed seed."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in np.unique(labels):
        pool = np.flatnonzero(labels == c)
        if len(pool) < per_class:
            raise ConfigError(f"fashion-mnist holds {len(pool)} images of class {c}, the "
                              f"subsample needs {per_class}: the IDX files are incomplete")
        picks.append(rng.choice(pool, per_class, replace=False))
    return np.sort(np.concatenate(picks))


def load(root: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """{"train"/"test": (uint8 images N x 3 x 28 x 28, int64 labels)} and the class names."""
    where = folder(root)
    out = {}
    for part, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        images, labels = (read_idx(_file(where, name)) for name in FILES[part])
        if len(images) != len(labels):
            raise ConfigError(f"fashion-mnist {part} files in {where} disagree: "
                              f"{len(images)} images, {len(labels)} labels")
        keep = balanced(labels, per_class)
        out[part] = (np.repeat(images[keep][:, None], 3, axis=1),
                     labels[keep].astype(np.int64))
    return out, list(CLASS_NAMES)

"""Checks of input that need no heavy library: dataset names, image folders, results folders.

Everything that can be known before training is checked here or in
:meth:`fedtune_core.config.RunConfig.validate`, in milliseconds and without importing
torch, so bad input is rejected with one line before anything is loaded or written.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

from fedtune_core.errors import ConfigError

DATASETS = ("digits", "fashion-mnist", "cifar10", "cifar100", "imagefolder:PATH", "synthetic")
# what torchvision's ImageFolder reads (torchvision.datasets.folder.IMG_EXTENSIONS)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# without train/ and test/, a stratified 20% of each class becomes the test set: with 5 or
# more images in every class, both sides get at least one image of each class
HOLDOUT_MIN = 5
IMAGEFOLDER_LAYOUT = "one sub-folder of images per class, or train/ and test/ folders of those"


def check_dataset(name: str) -> None:
    """Raise ConfigError unless ``name`` is a known dataset (an image folder is looked at)."""
    if not isinstance(name, str):
        raise ConfigError(f"dataset must be a string, got {name!r}")
    if name.startswith("imagefolder:"):
        check_imagefolder(name.split(":", 1)[1])
        return
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; valid choices: {', '.join(DATASETS)}")


def check_imagefolder(path: str) -> None:
    """An image folder has at least two classes, each with images (5 without train/test).

    Whether every image can be decoded is checked when the folder is loaded, before
    training. Cached per folder and modification time, so expanding a profile of many runs
    looks at the folder once.
    """
    if not path:
        raise ConfigError("imagefolder needs a path: give imagefolder:PATH with "
                          + IMAGEFOLDER_LAYOUT)
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"imagefolder path {path!r} is not a directory; give imagefolder:"
                          f"PATH with {IMAGEFOLDER_LAYOUT}")
    _check_imagefolder(str(root.resolve()), root.stat().st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _check_imagefolder(path: str, mtime: int) -> None:
    root = Path(path)
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = [_classes(root / part, 1) for part in ("train", "test")]
        if classes[0] != classes[1]:
            raise ConfigError(f"imagefolder {path!r}: train/ and test/ hold different classes "
                              f"({', '.join(classes[0])} vs {', '.join(classes[1])})")
    else:
        _classes(root, HOLDOUT_MIN)


def _classes(folder: Path, per_class: int) -> list[str]:
    """The class sub-folders of ``folder``, each holding ``per_class`` images or more."""
    try:
        classes = sorted(e.name for e in os.scandir(folder) if e.is_dir()
                         and not e.name.startswith("."))
    except OSError as err:
        raise ConfigError(f"imagefolder {str(folder)!r} cannot be read: {err.strerror}") from None
    if len(classes) < 2:
        raise ConfigError(f"imagefolder {str(folder)!r} has {len(classes)} class folder(s); "
                          f"it needs at least 2 ({IMAGEFOLDER_LAYOUT})")
    for name in classes:
        found = _count_images(folder / name, per_class)
        if found < per_class:
            raise ConfigError(f"imagefolder class folder {str(folder / name)!r} has {found} "
                              f"image(s) ({', '.join(IMAGE_SUFFIXES)}); each class needs at "
                              f"least {per_class}")
    return classes


def _count_images(folder: Path, enough: int) -> int:
    """Images under ``folder`` (recursively, like ImageFolder), counting up to ``enough``."""
    found = 0
    for _, _, files in os.walk(folder, followlinks=True):
        found += sum(f.lower().endswith(IMAGE_SUFFIXES) for f in files)
        if found >= enough:
            break
    return found


def check_results_folder(path: str | os.PathLike) -> None:
    """Raise ConfigError unless records can be written under ``path`` (``<path>/runs``).

    Probes by creating and removing a temporary file in the deepest folder that exists,
    so nothing is left behind (not even the folders that a run would create).
    """
    target = Path(path) / "runs"
    probe = target
    while not probe.exists():
        if probe.is_symlink() or probe.parent == probe:  # a dangling link, or no root at all
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"results folder {str(path)!r} cannot be used: {str(probe)!r} is a "
                          "file, not a folder; pass --results with a folder")
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".fedtune-probe-"):
            pass
    except OSError as err:
        why = err.strerror or str(err)
        raise ConfigError(f"results folder {str(path)!r} is not writable ({str(probe)!r}: "
                          f"{why}); pass --results with a writable folder") from None

"""Checks of input that need no heavy library: dataset names, image folders, results folders.

Everything that can be known before training is checked here or in
:meth:`fedtune_core.config.RunConfig.validate`, in milliseconds and without importing
torch, so bad input is rejected with one line before anything is loaded or written.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
from pathlib import Path

from fedtune_core.errors import ConfigError, shown

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
        entries = [e for e in os.scandir(folder) if not e.name.startswith(".")]
        for entry in entries:
            _refuse_link(entry)
        classes = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
    except OSError as err:
        raise ConfigError(f"imagefolder {str(folder)!r} cannot be read: {err.strerror}") from None
    if len(classes) < 2:
        raise ConfigError(f"imagefolder {str(folder)!r} has {len(classes)} class folder(s); "
                          f"it needs at least 2 ({IMAGEFOLDER_LAYOUT})")
    for name in classes:
        found = _count_images(folder / name)
        if found < per_class:
            raise ConfigError(f"imagefolder class folder {str(folder / name)!r} has {found} "
                              f"image(s) ({', '.join(IMAGE_SUFFIXES)}); each class needs at "
                              f"least {per_class}")
    return classes


def _count_images(folder: Path) -> int:
    """Images under ``folder`` (recursively, like ImageFolder); all of them are looked at.

    Raises:
        ConfigError: a link in the tree (followed, it could lead out of the tree or back
            into it, and one image would be loaded twice, maybe on both sides of the
            split), or an image name that is not a regular file (a pipe would block).
    """
    found = 0
    for top, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            path = os.path.join(top, name)
            if os.path.islink(path):
                _refuse_link(path)
        for name in files:
            if name.lower().endswith(IMAGE_SUFFIXES):
                path = os.path.join(top, name)
                if not os.path.isfile(path):
                    raise ConfigError(f"imagefolder image {shown(path)} is not a regular file;"
                                      " remove it or replace it with an image")
                found += 1
    return found


def _refuse_link(entry: os.DirEntry | str) -> None:
    path = entry.path if isinstance(entry, os.DirEntry) else entry
    if os.path.islink(path):
        raise ConfigError(f"imagefolder entry {shown(path)} is a symbolic link (to "
                          f"{shown(os.readlink(path))}); links are not followed: replace it "
                          "with the file or folder it points to")


def check_results_folder(path: str | os.PathLike) -> None:
    """Raise ConfigError unless records can be written under ``path`` (``<path>/runs``).

    Probes by creating and removing a temporary file in the deepest folder that exists,
    so nothing is left behind (not even the folders that a run would create).
    """
    target = Path(path) / "runs"
    _check_length(path, target)
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


NAME_MAX, PATH_MAX = 255, 4096  # bytes of one name, of a whole path (Linux)
RECORD_NAME = 40  # <hash>.json and the temp file's name under runs/ fit in this


def _check_length(path: str | os.PathLike, target: Path) -> None:
    """Refuse a results folder whose names (or whole path, with a record's) are too long."""
    for part in target.absolute().parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise ConfigError(f"results folder {shown(path)} has a name of "
                              f"{len(os.fsencode(part))} bytes, longer than {NAME_MAX}; pass "
                              "--results with shorter names")
    if len(os.fsencode(str(target.absolute()))) + RECORD_NAME + 64 > PATH_MAX:
        raise ConfigError(f"results folder {shown(path)} is too long a path (records need "
                          f"under {PATH_MAX} bytes); pass --results with a shorter path")


THREADS_ENV = "FEDTUNE_THREADS"
MAX_THREADS = 1024
_DEVICE = re.compile(r"^(auto|cpu(:0)?|cuda(:\d{1,3})?)$")


def threads() -> int:
    """``$FEDTUNE_THREADS``: the intra-op threads of a run process (default 1).

    Raises:
        ConfigError: not a whole number from 1 to :data:`MAX_THREADS`.
    """
    text = os.environ.get(THREADS_ENV, "").strip() or "1"
    value = int(text) if text.isdigit() else 0
    if not 1 <= value <= MAX_THREADS:
        raise ConfigError(f"{THREADS_ENV} must be a whole number from 1 to {MAX_THREADS}, "
                          f"got {text!r}")
    return value


MAX_RUNS_ENV = "FEDTUNE_MAX_RUNS"
MAX_RUNS = 20_000  # runs a profile may expand to (the paper profile: about 530)


def max_runs() -> int:
    """The most runs a profile may expand to: ``$FEDTUNE_MAX_RUNS``, default
    :data:`MAX_RUNS`.

    Raises:
        ConfigError: a value that is not a whole number >= 1.
    """
    text = os.environ.get(MAX_RUNS_ENV, "").strip()
    if not text:
        return MAX_RUNS
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{MAX_RUNS_ENV} must be a whole number >= 1, got {text!r}")
    return int(text)


def check_environment() -> None:
    """The environment variables fedtune reads, checked in microseconds (one line each)."""
    from fedtune_core import lock

    threads()
    lock.lock_wait()
    max_runs()


def check_device(name: str, local: bool = True) -> None:
    """Reject a device name that cannot be right without importing torch.

    A name that is not ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, or (``local``) a CUDA
    device on a machine without a GPU driver, is refused here; whether ``cuda:N`` exists
    where a driver is present is left to :func:`fedtune_core.fl.training.pick_device`.
    """
    cuda = _cuda_present()
    if isinstance(name, str) and _DEVICE.match(name) and (cuda or not local
                                                          or not name.startswith("cuda")):
        return
    valid = "auto, cpu, cuda, cuda:N" if cuda or not local else "auto, cpu"
    raise ConfigError(f"unknown or unavailable device {name!r}; valid choices here: {valid}")


def _cuda_present() -> bool:
    """Whether a GPU driver (NVIDIA's, or ROCm's) is there and CUDA_VISIBLE_DEVICES leaves
    a device visible."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/proc/driver/nvidia/gpus").is_dir() or Path("/dev/kfd").exists()

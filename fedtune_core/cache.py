"""The on-disk cache of things fedtune builds once (glyph corpora, pre-trained checkpoints).

A ground-floor module: a folder, an exclusive lock between processes, and atomic writes
(a temporary file in the same folder, fsynced, renamed onto its name only when complete).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def cache_dir() -> Path:
    """``$FEDTUNE_CACHE_DIR``, else ``~/.cache/fedtune``."""
    return Path(os.environ.get("FEDTUNE_CACHE_DIR") or Path.home() / ".cache" / "fedtune")


@contextlib.contextmanager
def lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (flock) while the block runs; other processes wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def staged(path: Path) -> Iterator[Path]:
    """A temporary file next to ``path`` to write; fsynced and renamed onto ``path`` if the
    block succeeds, removed if it fails. Readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

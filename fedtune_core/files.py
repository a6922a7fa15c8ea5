"""Files that must never be seen half-written: the one atomic write, and the cache folder.

A ground-floor module, used by every room that writes: the run records and their locks
(:mod:`fedtune_core.runs.store`), the glyph corpora and pre-trained checkpoints in the cache
(:func:`cache_dir`), reports and ``index.html``.

- :func:`staged` and :func:`write_text`: a temporary file in the same folder, named after
  its writer (host and pid), fsynced and renamed onto its name only when complete, so
  readers never see a partial file; the next call removes what a killed writer left
  (:func:`clean_temps`). The one lock is :class:`fedtune_core.lock.Lock`.

Faults of the machine (a full disk, a read-only or misplaced folder, a lock held too long,
something that is not a regular file where a file must be written) are one line
(:class:`~fedtune_core.errors.Fault`), never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from fedtune_core.errors import Fault, shown

STALE_SECONDS = 3600  # a temp file of another host (or of no known writer) older than this
_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.[^.]*\.tmp$")
_FULL = (errno.ENOSPC, errno.EDQUOT)


def cache_dir() -> Path:
    """``$FEDTUNE_CACHE_DIR``, else ``~/.cache/fedtune``."""
    return Path(os.environ.get("FEDTUNE_CACHE_DIR") or Path.home() / ".cache" / "fedtune")


def host() -> str:
    """This machine's name without dots (it goes into file names)."""
    return socket.gethostname().replace(".", "-") or "localhost"


def tmp_prefix(path: Path) -> str:
    """The prefix of a temporary file that will become ``path``: its writer's host and pid."""
    return f".{path.name}.{host()}.{os.getpid()}."


def not_regular(path: Path, what: str) -> Fault:
    """A :class:`Fault`: a folder, a link, a pipe or a device stands where ``what`` (a lock,
    a record) must be a regular file."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        mode = 0
    return Fault(f"{what} {shown(path)} is {kind(mode)}, not a regular file; remove it and "
                 "run again")


def kind(mode: int) -> str:
    """What an ``st_mode`` that is not a regular file's is: ``a folder``, ``a pipe`` ..."""
    return ("a folder" if stat.S_ISDIR(mode) else "a link" if stat.S_ISLNK(mode)
            else "a pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")


def write_fault(err: OSError, path: Path, size: int | None = None) -> Fault:
    """A one-line :class:`Fault` for a write of ``path`` the file system refused."""
    why = err.strerror or type(err).__name__
    if err.errno in _FULL:
        need = f"{size:,} bytes needed, " if size is not None else ""
        why += f" ({need}{free_bytes(path.parent):,} bytes free)"
        return Fault(f"cannot write {shown(path)}: {why}; free some space and run again "
                     "(what was finished is kept)")
    if err.errno == errno.ENAMETOOLONG:
        return Fault(f"cannot write {shown(path)}: its name is too long; use a shorter path")
    return Fault(f"cannot write {shown(path)}: {why}; give a writable folder (for the cache: "
                 "set FEDTUNE_CACHE_DIR)")


def free_bytes(folder: Path) -> int:
    """Bytes free for this user in the file system of ``folder`` (0 if unknown)."""
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    try:
        st = os.statvfs(folder)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def clean_temps(folder: str | os.PathLike) -> int:
    """Remove the temp files that dead writers left in ``folder``; how many went.

    A temp file goes if its writer (host, pid in its name) is this host's and no longer
    runs, or if it is older than :data:`STALE_SECONDS` (another host's, or a name without
    a writer).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for path in folder.glob(".*.tmp"):
        if _stale_tmp(path):
            try:
                path.unlink(missing_ok=True)
            except OSError:  # a read-only folder: left for a call that can write there
                continue
            removed += 1
    return removed


def _stale_tmp(path: Path) -> bool:
    match = _TMP.match(path.name)
    if match and match["host"] == host():
        return not _alive(int(match["pid"]))
    try:
        return time.time() - path.stat().st_mtime > STALE_SECONDS
    except FileNotFoundError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


# -- the one atomic write ---------------------------------------------------------------------

@contextlib.contextmanager
def staged(path: str | os.PathLike, size: int | None = None) -> Iterator[Path]:
    """A temporary file next to ``path`` to write; fsynced and renamed onto ``path`` if the
    block succeeds, removed if it fails. Readers never see a partial file.

    The file gets the mode ``open()`` would give it (0644 under the usual umask).

    Args:
        path: the file to write.
        size: the bytes it will hold, if known: a full disk's message says so.

    Raises:
        Fault: the file system refused the write (full, read-only, name too long), or a
            folder, link, pipe or device stands at ``path``; nothing is left behind.
    """
    path, tmp = Path(path), None
    try:
        if os.path.lexists(path) and not path.is_file() or path.is_symlink():
            raise not_regular(path, "file")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=tmp_prefix(path), suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise write_fault(err, path, size) from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`staged`)."""
    data = text.encode()
    with staged(path, len(data)) as tmp:
        tmp.write_bytes(data)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_capped(path: str | os.PathLike, limit: int) -> str:
    """The text of the regular file at ``path``, at most ``limit`` bytes of it.

    Never blocks on a pipe or a device, never follows a link.

    Raises:
        FileNotFoundError: nothing there.
        ValueError: not a regular file, or larger than ``limit`` (the message says which).
    """
    mode = os.lstat(path).st_mode
    if not stat.S_ISREG(mode):
        raise ValueError(f"it is {kind(mode)}, not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"it is larger than {limit:,} bytes")
    return data.decode()

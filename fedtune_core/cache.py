"""The on-disk cache of things fedtune builds once (glyph corpora, pre-trained checkpoints).

A ground-floor module: a folder, an exclusive lock between processes, and atomic writes
(a temporary file in the same folder, fsynced, renamed onto its name only when complete).
Temporary files are named after their writer (host and pid), so the next call that owns
the folder removes what a killed writer left (:func:`clean_temps`). Faults of the machine
(a full disk, a read-only or misplaced folder, a lock held too long) are one line
(:class:`~fedtune_core.errors.Fault`), never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
import re
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from fedtune_core.errors import ConfigError, Fault, shown

STALE_SECONDS = 3600  # a temp file of another host (or of no known writer) older than this
LOCK_WAIT_ENV = "FEDTUNE_LOCK_WAIT"
LOCK_WAIT_DEFAULT = 24 * 3600.0  # seconds a lock held by a live process is waited for
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


def lock_wait() -> float:
    """Seconds to wait for a lock a live process holds: ``$FEDTUNE_LOCK_WAIT`` (a number
    of seconds, or ``forever``), default a day.

    Raises:
        ConfigError: a value that is neither.
    """
    text = os.environ.get(LOCK_WAIT_ENV, "").strip()
    if not text:
        return LOCK_WAIT_DEFAULT
    if text.lower() == "forever":
        return math.inf
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < math.inf:
        raise ConfigError(f"{LOCK_WAIT_ENV} must be a number of seconds >= 0 or 'forever', "
                          f"got {text!r}")
    return value


def wait_flock(fd: int, what: str, holder: str) -> None:
    """Take an exclusive ``flock`` on ``fd``, waiting at most :func:`lock_wait` seconds.

    Raises:
        Fault: still held by ``holder`` (a live process: the kernel frees a dead one's).
    """
    bound = lock_wait()
    if math.isinf(bound):
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + bound
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Fault(f"{what} is still held by {holder} after {bound:g} s; stop that "
                            f"process, or set {LOCK_WAIT_ENV}=SECONDS (or forever) to wait "
                            "longer") from None
            time.sleep(min(0.5, left))


@contextlib.contextmanager
def lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (flock) while the block runs; other processes wait
    (at most :func:`lock_wait` seconds)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as err:
        if err.errno in (errno.EISDIR, errno.ELOOP):
            raise not_regular(path, "lock") from None
        raise write_fault(err, path) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise not_regular(path, "lock")
        wait_flock(fd, f"lock {shown(path)}", "another process")
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged(path: Path, size: int | None = None) -> Iterator[Path]:
    """A temporary file next to ``path`` to write; fsynced and renamed onto ``path`` if the
    block succeeds, removed if it fails. Readers never see a partial file.

    Args:
        path: the file to write.
        size: the bytes it will hold, if known: a full disk's message says so.

    Raises:
        Fault: the file system refused the write (full, read-only, name too long).
    """
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=tmp_prefix(path), suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as err:
        raise write_fault(err, path, size) from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


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

"""The one lock: an exclusive ``flock`` on a lock file, for run records and cached artefacts.

A ground-floor module. The lock file holds its owner's pid and host (so a message can say
who holds it), is waited for at most :func:`lock_wait` seconds (``$FEDTUNE_LOCK_WAIT``),
and is removed on release. The kernel releases a dead owner's flock, so a killed owner's
lock is taken over by the next process; :func:`clean_stale` removes the lock files (and
temp files) that dead processes left.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import stat
import time
from pathlib import Path

from fedtune_core.errors import ConfigError, Fault, diagnostics, shown
from fedtune_core.files import clean_temps, host, not_regular, write_fault

LOCK_WAIT_ENV = "FEDTUNE_LOCK_WAIT"
LOCK_WAIT_DEFAULT = 24 * 3600.0  # seconds a lock held by a live process is waited for


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


class Lock:
    """An exclusive lock on the file ``path``: ``with Lock(path, wait) as lock``.

    ``lock.held`` is False when another live process holds it and ``wait`` is False.
    Otherwise a lock held by another process is waited for (at most :func:`lock_wait`
    seconds; with ``waiting``, one line on stderr says for whom). The lock file holds its
    owner's pid and host, and is removed on release, as are the folders it had to create
    (if still empty), so a process refused before writing anything leaves nothing behind.

    Args:
        path: the lock file.
        wait: wait for another process's lock (else ``held`` is False at once).
        what: the lock in a message about the file itself (``run lock``, ``lock``).
        name: the lock in a message about its holder (default: ``what`` and the path).
        waiting: the line printed before waiting, with ``{owner}`` for the holder.
    """

    def __init__(self, path: str | os.PathLike, wait: bool = True, *, what: str = "lock",
                 name: str | None = None, waiting: str | None = None):
        self.path = Path(path)
        self.wait = wait
        self.what, self.name = what, name or f"{what} {shown(path)}"
        self.waiting = waiting
        self.held = False
        self._fd: int | None = None
        self._created: list[Path] = []

    def __enter__(self) -> Lock:
        try:
            self._created = _make_dirs(self.path.parent)
        except OSError as err:
            raise write_fault(err, self.path) from None
        try:
            while not self.held:
                fd = self._open()
                if not self._lock(fd):
                    os.close(fd)
                    break
                if _same_file(fd, self.path):  # not a file its last owner just removed
                    self._fd, self.held = fd, True
                else:
                    os.close(fd)
            if self.held:
                os.ftruncate(self._fd, 0)
                os.write(self._fd, f"{os.getpid()} {host()}\n".encode())
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _open(self) -> int:
        """Open (or create) the lock file; one that is not a regular file is refused."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK,
                         0o644)
        except OSError as err:
            if err.errno in (errno.EISDIR, errno.ELOOP):
                raise not_regular(self.path, self.what) from None
            raise write_fault(err, self.path) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise not_regular(self.path, self.what)
        return fd

    def _lock(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if not self.wait:
                return False
        if self.waiting and lock_wait() > 0:
            print("fedtune: " + self.waiting.format(owner=owner(fd)), file=diagnostics(),
                  flush=True)
        wait_flock(fd, self.name, owner(fd))
        return True

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # still holding it: nobody else can be inside
            os.close(self._fd)
            self._fd, self.held = None, False
        for folder in reversed(self._created):
            try:
                folder.rmdir()
            except OSError:  # not empty: a record (or another process's file) is in it
                break


def owner(fd: int) -> str:
    """Who holds a lock, from what it wrote into the lock file."""
    text = os.pread(fd, 200, 0).decode(errors="replace").split()
    return f"pid {text[0]} on {text[1]}" if len(text) >= 2 else "another process"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _make_dirs(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return those created, outermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return list(reversed(missing))


def clean_stale(folder: str | os.PathLike) -> int:
    """Remove the temp files and lock files that dead processes left in ``folder``.

    Temp files as :func:`clean_temps` says; a lock file goes if nobody holds it (one that
    is not a regular file is left to the process that needs it, which refuses it in one
    line). Returns how many files were removed.
    """
    folder = Path(folder)
    removed = clean_temps(folder)
    if not folder.is_dir():
        return removed
    for path in folder.glob("*.lock"):
        if not path.is_file() or path.is_symlink():  # refused by the process that needs it
            continue
        with Lock(path, wait=False) as lock:
            removed += lock.held  # released (and removed) on leaving the block
    return removed

"""What keeps the run records trustworthy: their schema, per-run locks, stale temp files.

- A record that does not validate (:func:`problem`) is reported once, by one warning line
  naming the file, and counts as missing: the run is computed again, never served from it.
- A run is computed under a lock (``runs/<hash>.lock``, holding the owner's pid and host),
  so two grids on one results folder never compute the same run at once; the lock is an
  ``flock``, which the kernel releases when its owner dies, so a killed owner's lock is
  taken over by the next process.
- Writes go through temporary files named after their writer (host and pid); a killed
  writer's leftovers are removed by the next call (:func:`clean_stale`).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import math
import os
import stat
from pathlib import Path
from typing import Any

from fedtune_core import cache
from fedtune_core.cache import STALE_SECONDS, host, tmp_prefix  # noqa: F401  (store.host)
from fedtune_core.config import OMITTED_AT_DEFAULT, RunConfig
from fedtune_core.errors import ConfigError, diagnostics, shown

SCHEMA = 1
STATUSES = ("ok", "failed")
MAX_RECORD_BYTES = 64 * 2**20  # a record is a few kB; what is read of a file is capped
_warned: set[tuple[str, int]] = set()


# -- the record schema -----------------------------------------------------------------------

def problem(record: Any, path: str | os.PathLike) -> str | None:
    """Why ``record`` (read from ``path``) is not a valid run record; None if it is."""
    if not isinstance(record, dict):
        return f"it holds a JSON {type(record).__name__}, not an object"
    if record.get("schema") != SCHEMA:
        return f"schema {record.get('schema')!r}, expected {SCHEMA}"
    if record.get("status") not in STATUSES:
        return f"status {record.get('status')!r}, expected one of {', '.join(STATUSES)}"
    stem = Path(path).stem
    if record.get("hash") != stem:
        return f"hash {record.get('hash')!r} does not match the file name"
    if not isinstance(record.get("config"), dict):
        return "it has no config"
    if missing := [f.name for f in dataclasses.fields(RunConfig)
                   if f.name not in record["config"] and f.name not in OMITTED_AT_DEFAULT]:
        return f"its config lacks {', '.join(missing)}"
    try:
        cfg = RunConfig.from_dict(record["config"])
    except (ConfigError, TypeError) as err:
        return f"its config is not valid ({err})"
    if cfg.hash != stem:
        return f"its config hashes to {cfg.hash}, not to the file name"
    rounds, final = record.get("rounds"), record.get("final")
    if not isinstance(rounds, list) or not all(isinstance(r, dict) for r in rounds):
        return "its rounds are not a list of objects"
    if not isinstance(final, dict):
        return "its final metrics are not an object"
    if record["status"] == "failed":
        return None if isinstance(record.get("error"), str) else "a failed record without error"
    if not rounds or not final:
        return "an ok record without rounds or final metrics"
    return _nonfinite(rounds, final)


def _nonfinite(rounds: list[dict], final: dict) -> str | None:
    """A metric that was not finite (written as null), in an ok record: it diverged."""
    for row in [*rounds, final]:
        if not isinstance(row.get("round", 0), int) or isinstance(row.get("round"), bool):
            return f"a round number {row['round']!r} that is not a whole number"
        where = f"round {row['round']}" if "round" in row else "the final metrics"
        if row.get("round", 0) >= 1 and not _is_number(row.get("train_loss")):
            return f"no finite train_loss in {where} (a diverged run recorded as ok)"
        for key, value in row.items():
            loss = key[: -len("_acc")] + "_loss" if key.endswith("_acc") else None
            if _is_number(value) and loss in row and not _is_number(row[loss]):
                return f"no finite {loss} in {where} (a diverged run recorded as ok)"
    return None


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def warn_once(path: str | os.PathLike, why: str) -> None:
    """One warning line on stderr per file (and version of it) per process."""
    path = Path(path)
    try:
        key = (str(path.resolve()), path.stat().st_mtime_ns)
    except OSError:
        key = (str(path), 0)
    if key not in _warned:
        _warned.add(key)
        print(f"fedtune: warning: ignoring run record {shown(path)}: {why}; the run counts as "
              "missing and will be computed again", file=diagnostics(), flush=True)


def read_capped(path: str | os.PathLike, limit: int | None = None) -> str:
    """The text of the regular file at ``path``, at most ``limit`` bytes of it (default
    :data:`MAX_RECORD_BYTES`).

    Never blocks on a pipe or a device, never follows a link.

    Raises:
        FileNotFoundError: nothing there.
        ValueError: not a regular file, or larger than ``limit`` (the message says which).
    """
    limit = MAX_RECORD_BYTES if limit is None else limit
    mode = os.lstat(path).st_mode
    if not stat.S_ISREG(mode):
        raise ValueError(f"it is {cache.kind(mode)}, not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"it is larger than {limit:,} bytes")
    return data.decode()


def check_record_path(path: str | os.PathLike) -> None:
    """Raise :class:`~fedtune_core.errors.Fault` if a record (or its lock) could not be
    written at ``path``: something that is not a regular file stands there. Checked before
    a run is computed, so a result is never computed only to be lost at the write."""
    path = Path(path)
    for where, what in ((path, "run record"), (path.with_suffix(".lock"), "run lock")):
        if os.path.lexists(where) and (where.is_symlink() or not where.is_file()):
            raise cache.not_regular(where, what)


# -- per-run locks ---------------------------------------------------------------------------

class RunLock:
    """An exclusive lock on one run: ``with RunLock(record_path, wait) as lock``.

    ``lock.held`` is False when another live process holds it and ``wait`` is False (with
    ``wait``, one line on stderr says whom this process waits for). The lock file
    is removed on release, and so are the folders it had to create (if still empty), so a
    run refused before writing its record leaves nothing behind.
    """

    def __init__(self, record: str | os.PathLike, wait: bool = True):
        self.path = Path(record).with_suffix(".lock")
        self.wait = wait
        self.held = False
        self._fd: int | None = None
        self._created: list[Path] = []

    def __enter__(self) -> RunLock:
        self._created = _make_dirs(self.path.parent)
        try:
            while not self.held:
                fd = _open_lock(self.path)
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

    def _lock(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if not self.wait:
                return False
        if cache.lock_wait() > 0:
            print(f"fedtune: run {self.path.stem} is being computed by {owner(fd)}; waiting "
                  "for it", file=diagnostics(), flush=True)
        cache.wait_flock(fd, f"run {self.path.stem}", owner(fd))
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


def _open_lock(path: Path) -> int:
    """Open (or create) a lock file; one that is not a regular file is refused in one line."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as err:
        if err.errno in (errno.EISDIR, errno.ELOOP):
            raise cache.not_regular(path, "run lock") from None
        raise cache.write_fault(err, path) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise cache.not_regular(path, "run lock")
    return fd


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


# -- leftovers of killed processes -------------------------------------------------------------

def clean_stale(folder: str | os.PathLike) -> int:
    """Remove the temp files and lock files that dead processes left in ``folder``.

    Temp files as :func:`fedtune_core.cache.clean_temps` says; a lock file goes if nobody
    holds it (one that is not a regular file is left to the run that needs it, which
    refuses it in one line). Returns how many files were removed.
    """
    folder = Path(folder)
    removed = cache.clean_temps(folder)
    if not folder.is_dir():
        return removed
    for path in folder.glob("*.lock"):
        if not path.is_file() or path.is_symlink():  # refused by the run that needs it
            continue
        with RunLock(path, wait=False) as lock:
            removed += lock.held  # released (and removed) on leaving the block
    return removed

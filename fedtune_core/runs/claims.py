"""The one path from a config to its record: claim the run's lock, compute, write atomically.

``fedtune run`` (:func:`run`, a grid of one config) and ``fedtune grid``
(:func:`fedtune_core.study.grid.ensure`) both go through :func:`pending` and :func:`ensure`:

- a record that could not be written is not computed (:func:`pending` checks every path
  first), and a run with a record that spares it is skipped (ok, or diverged unless
  ``retry_failed``: :func:`fedtune_core.runs.store.kept`);
- each run is claimed just before it starts: its lock (``runs/<hash>.lock``) is taken and
  its record looked for once more (another process may have just finished it);
- the driver, holding the lock, writes the record atomically the moment its run ends,
  then lets go. A run another process holds is skipped at first, then waited for and its
  record used. If a write fails (a full disk), nothing more starts; the runs under way end
  and their records are written once more, and the first fault is raised.

Where a run is computed (in this process, a pool of workers, Ray) is the caller's
``compute`` (:data:`Compute`); nothing here knows.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from fedtune_core.config import RunConfig
from fedtune_core.errors import Fault
from fedtune_core.runs import records, store
from fedtune_core.runs.steps import Claim

# computes the runs it is given, asking ``claim`` before each; yields (config, record)
Compute = Callable[[list[RunConfig], Claim], Iterable[tuple[RunConfig, dict]]]


def pending(cfgs: Sequence[RunConfig], results: str | os.PathLike, *, force: bool = False,
            retry_failed: bool = False) -> list[RunConfig]:
    """The configs of ``cfgs`` that need computing, after removing what dead processes left
    in ``runs/`` and checking that every record could be written.

    Raises:
        Fault: something that is not a regular file stands where a record or lock goes.
    """
    store.clean_stale(Path(results, "runs"))
    for cfg in cfgs:  # a record that could not be written is not computed
        store.check_record_path(store.record_path(results, cfg))
    if force:
        return list(cfgs)
    return [c for c in cfgs if store.kept(results, c, retry_failed=retry_failed) is None]


def ensure(todo: Sequence[RunConfig], results: str | os.PathLike, compute: Compute, *,
           force: bool = False, retry_failed: bool = False, wait: bool = True,
           done: Callable[[RunConfig], Any] | None = None) -> dict[str, dict]:
    """Compute ``todo`` (from :func:`pending`) under their locks; write each record as its
    run ends. Returns the records by config hash: those written here and those another
    process finished; a run another process holds is missing when not ``wait``.

    Args:
        compute: what runs them (see :data:`Compute`).
        done: called with each config whose record is in place (a progress bar).

    Raises:
        Fault: a record that could not be written (the first such fault; every record
            written is whole, and the next call computes what is left).
    """
    found: dict[str, dict] = {}
    for waiting in (False, True) if wait else (False,):  # then the runs others were computing
        if not todo:
            break
        with Claims(results, force, retry_failed, waiting, done) as claims:
            for cfg, record in compute(list(todo), claims.take):
                claims.finish(cfg, record)
            claims.write_kept()
        found |= claims.records
        todo = claims.busy
    return found


def run(cfg: RunConfig, results: str | os.PathLike, *, device: str | None = None,
        data_root: str | None = None, progress: bool = False, force: bool = False,
        retry_failed: bool = False, record_config_errors: bool = False,
        wait: bool = True, execute: Callable[[RunConfig], Any] | None = None) -> dict | None:
    """Run ``cfg`` unless a record makes it needless; write and return its record: a grid
    of one config, computed in this process.

    If another process holds the run's lock, this one waits for it and then uses that
    process's record (or, with ``wait=False``, returns None). A run that raises is recorded
    as ``failed`` with its error (``failure``: ``diverged`` or ``error``) and the exception
    is not propagated. Bad input (:class:`~fedtune_core.errors.ConfigError`, e.g. a
    partition that does not fit the data, or weights that cannot be read) is re-raised
    without writing anything unless ``record_config_errors``. ``execute(cfg)`` computes the
    outcome in place of the config's engine (the ServerApp of a Flower deployment passes
    its own).
    """
    todo = pending([cfg], results, force=force, retry_failed=retry_failed)
    if not todo:
        return store.kept(results, cfg, retry_failed=retry_failed, warn=False)

    def here(cfgs: list[RunConfig], claim: Claim) -> Iterator[tuple[RunConfig, dict]]:
        for c in cfgs:
            if claim(c):
                yield c, records.compute(c, device=device, data_root=data_root,
                                         progress=progress, execute=execute,
                                         record_config_errors=record_config_errors)

    return ensure(todo, results, here, force=force, retry_failed=retry_failed,
                  wait=wait).get(cfg.hash)


class Claims:
    """The run locks this process (the driver) holds while its runs are computed, and the
    records in place so far (:attr:`records`, by hash)."""

    def __init__(self, results: str | os.PathLike, force: bool, retry_failed: bool,
                 wait: bool, done: Callable[[RunConfig], Any] | None = None):
        self.results, self.force, self.retry_failed = results, force, retry_failed
        self.wait, self.done = wait, done or (lambda cfg: None)
        self.records: dict[str, dict] = {}
        self.locks: dict = {}
        self.busy: list[RunConfig] = []  # held by another process (when not waiting)
        self.unwritten: list[tuple[RunConfig, dict]] = []  # computed; their write failed
        self.fault: Fault | None = None

    def take(self, cfg: RunConfig) -> bool:
        """Lock ``cfg`` before it starts; False if another process holds it or has just
        finished it (then its record is used), or once a write has failed (nothing more
        starts: the runs under way end and are written, or kept in memory)."""
        if self.fault is not None:
            return False

        lock = store.run_lock(store.record_path(self.results, cfg), wait=self.wait).__enter__()
        if not lock.held:
            self.busy.append(cfg)
            return False
        if not self.force and (hit := store.kept(self.results, cfg,
                                                 retry_failed=self.retry_failed, warn=False)):
            lock.__exit__(None, None, None)  # another process finished it since we looked
            self.records[cfg.hash] = hit
            self.done(cfg)
            return False
        self.locks[cfg.hash] = lock
        return True

    def finish(self, cfg: RunConfig, record: dict) -> None:
        """Write the record of ``cfg`` (atomically), then let go of its lock; if the write
        fails (a full disk), keep the record and the lock for :meth:`write_kept`."""
        try:
            store.write_json(store.record_path(self.results, cfg), record)
        except Fault as err:
            self.fault = self.fault or err
            self.unwritten.append((cfg, record))
            return
        self.locks.pop(cfg.hash).__exit__(None, None, None)
        self.records[cfg.hash] = record
        self.done(cfg)

    def write_kept(self) -> None:
        """After a failed write: write once more the records kept in memory (space may have
        been freed since), then stop.

        Raises:
            Fault: the first failed write: the grid stops there (every record written is
                whole; the next call computes what is left).
        """
        kept, self.unwritten = self.unwritten, []
        for cfg, record in kept:
            self.finish(cfg, record)
        if self.fault is not None:
            raise self.fault

    def __enter__(self) -> Claims:
        return self

    def __exit__(self, *exc: object) -> None:
        for lock in self.locks.values():  # runs that never finished (an interrupted grid)
            lock.__exit__(None, None, None)

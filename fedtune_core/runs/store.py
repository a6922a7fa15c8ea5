"""Where run records live: their path, schema, reading, writing, locks, stale leftovers.

- A record that does not validate (:func:`problem`) is reported once, by one warning line
  naming the file, and counts as missing: the run is computed again, never served from it.
- A run is computed under a lock (``runs/<hash>.lock``, holding the owner's pid and host),
  so two grids on one results folder never compute the same run at once; the lock is an
  ``flock``, which the kernel releases when its owner dies, so a killed owner's lock is
  taken over by the next process.
- A record lives at ``<results>/runs/<config hash>.json``. A record with status ``ok`` is
  a cache hit; so is a diverged one (``failure: "diverged"``, deterministic: the same
  config diverges again) unless ``retry_failed`` (:func:`kept`); other failures run again.
- Writes go through :func:`fedtune_core.files.write_text` (temporary files named after
  their writer, fsynced, renamed); a killed writer's leftovers are removed by the next call
  (:func:`clean_stale`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from fedtune_core import files, lock
from fedtune_core.config import OMITTED_AT_DEFAULT, RunConfig
from fedtune_core.errors import ConfigError, diagnostics, is_number, shown
from fedtune_core.lock import Lock

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
        if row.get("round", 0) >= 1 and not is_number(row.get("train_loss")):
            return f"no finite train_loss in {where} (a diverged run recorded as ok)"
        for key, value in row.items():
            loss = key[: -len("_acc")] + "_loss" if key.endswith("_acc") else None
            if is_number(value) and loss in row and not is_number(row[loss]):
                return f"no finite {loss} in {where} (a diverged run recorded as ok)"
    return None


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
    """The text of the regular file at ``path`` (:func:`fedtune_core.files.read_capped`), at
    most ``limit`` bytes of it (default :data:`MAX_RECORD_BYTES`)."""
    return files.read_capped(path, MAX_RECORD_BYTES if limit is None else limit)


def check_record_path(path: str | os.PathLike) -> None:
    """Raise :class:`~fedtune_core.errors.Fault` if a record (or its lock) could not be
    written at ``path``: something that is not a regular file stands there. Checked before
    a run is computed, so a result is never computed only to be lost at the write."""
    path = Path(path)
    for where, what in ((path, "run record"), (path.with_suffix(".lock"), "run lock")):
        if os.path.lexists(where) and (where.is_symlink() or not where.is_file()):
            raise files.not_regular(where, what)


# -- per-run locks ---------------------------------------------------------------------------

def run_lock(record: str | os.PathLike, wait: bool = True) -> Lock:
    """The lock of one run, ``runs/<hash>.lock`` beside its record: ``with run_lock(path,
    wait) as lock`` (:class:`fedtune_core.lock.Lock`; ``lock.held`` False when another live
    process holds it and ``wait`` is False). A wait is announced in one line on stderr."""
    path = Path(record).with_suffix(".lock")
    return Lock(path, wait, what="run lock", name=f"run {path.stem}",
                waiting=f"run {path.stem} is being computed by {{owner}}; waiting for it")


def clean_stale(folder: str | os.PathLike) -> int:
    """What dead processes left in a runs folder (:func:`fedtune_core.lock.clean_stale`)."""
    return lock.clean_stale(folder)


# -- reading and writing records ------------------------------------------------------------

def record_path(results: str | os.PathLike, cfg: RunConfig) -> Path:
    """Where the record of ``cfg`` lives under the results folder."""
    return Path(results) / "runs" / f"{cfg.hash}.json"


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Serialise ``payload`` first, then write it atomically
    (:func:`fedtune_core.files.write_text`)."""
    files.write_text(path, json.dumps(_finite(payload), indent=1, allow_nan=False, default=_plain))


def _finite(value: Any) -> Any:
    """NaN and infinities become None (strict JSON has no such numbers)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_record(path: str | os.PathLike, warn: bool = True) -> dict | None:
    """The valid record at ``path``, or None if it is missing or not a valid record.

    An invalid one (unreadable JSON, or not the schema: :func:`fedtune_core.runs.store.problem`)
    is named in one warning line on stderr, once per process, unless ``warn`` is False.
    """
    try:
        text = read_capped(path)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        why = f"it cannot be read ({getattr(err, 'strerror', None) or type(err).__name__})"
    except ValueError as err:  # not a regular file, or too large
        why = str(err)
    else:
        try:
            record = json.loads(text)
        except ValueError:
            why = "it is not valid JSON (empty or truncated?)"
        else:
            if (why := problem(record, path)) is None:
                return record
    if warn:
        warn_once(path, why)
    return None


def kept(results: str | os.PathLike, cfg: RunConfig, *, retry_failed: bool = False,
         warn: bool = True) -> dict | None:
    """The record that makes running ``cfg`` again needless, if there is one.

    That is an ok record, or a diverged one (deterministic: the same config would diverge
    again) unless ``retry_failed``. Other failures (an exception, a killed worker: the
    environment's fault, maybe passing) are always run again.
    """
    rec = read_record(record_path(results, cfg), warn)
    if rec is None or rec["status"] == "ok":
        return rec
    return rec if diverged(rec) and not retry_failed else None


def diverged(record: dict) -> bool:
    """Whether ``record`` is a run that diverged."""
    return record.get("status") == "failed" and record.get("failure") == "diverged"


def load_records(results: str | os.PathLike, status: str | None = "ok") -> list[dict]:
    """Every valid record under ``<results>/runs`` (only ``status`` ones unless None).

    Invalid ones are skipped, each named once in a warning line.
    """
    records = (read_record(p) for p in sorted(Path(results, "runs").glob("*.json")))
    return [r for r in records if r and (status is None or r.get("status") == status)]

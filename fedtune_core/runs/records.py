"""One JSON record per run, written atomically; the run cache that makes a grid resumable.

A record lives at ``<results>/runs/<config hash>.json``. It is written once, complete,
through a temporary file and an atomic rename, so a crash or a kill never leaves a
half-written record; it is computed under a per-run lock, so two grids on one folder never
compute it twice. A record with status ``ok`` is a cache hit. A ``failed`` one is run again
on the next call, except a diverged run (``failure: "diverged"``): that is deterministic,
the same config diverges again, so it is kept unless ``retry_failed`` or ``force``. A
record that does not validate (:func:`fedtune_core.runs.store.problem`) is reported once and
counts as missing.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import platform
import subprocess
import time
import traceback
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from fedtune_core import files
from fedtune_core.config import RunConfig
from fedtune_core.errors import Diverged
from fedtune_core.runs import store

SCHEMA = store.SCHEMA
PACKAGES = ("fedtune", "torch", "torchvision", "timm", "open_clip_torch", "peft", "numpy",
            "scikit-learn", "flwr", "ray")


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
        text = store.read_capped(path)
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
            if (why := store.problem(record, path)) is None:
                return record
    if warn:
        store.warn_once(path, why)
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


def environment() -> dict[str, Any]:
    """Versions, git commit and hardware, for the record."""
    import torch

    versions = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    hardware = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    return {"versions": versions, "git": git_state(), "hardware": hardware}


def git_state() -> dict[str, Any]:
    """Commit and dirty flag of the checkout fedtune runs from (None outside git)."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(dirty) if dirty is not None else None}


def run(cfg: RunConfig, results: str | os.PathLike, *, device: str | None = None,
        data_root: str | None = None, progress: bool = False, force: bool = False,
        retry_failed: bool = False, record_config_errors: bool = False,
        wait: bool = True, execute: Callable[[RunConfig], Any] | None = None) -> dict | None:
    """Run ``cfg`` unless a record makes it needless (:func:`kept`); write and return its record.

    The run is computed under its lock: if another process holds it, this one waits for
    it and then uses that process's record (or, with ``wait=False``, returns None at once).
    A run that raises is recorded as ``failed`` with its error (``failure``: ``diverged``
    or ``error``) and the exception is not propagated, so a grid goes on. Bad input
    (:class:`ConfigError`, e.g. a partition that does not fit the data, or weights that
    cannot be read) is re-raised without writing anything unless ``record_config_errors``.
    ``execute(cfg)`` computes the outcome in place of :func:`fedtune_core.fl.fedavg.execute` (the
    ServerApp of a Flower deployment passes its own).
    """
    store.clean_stale(Path(results, "runs"))
    path = record_path(results, cfg)
    store.check_record_path(path)  # before computing: a result that cannot be kept is not made
    if not force and (hit := kept(results, cfg, retry_failed=retry_failed)):
        return hit
    with store.run_lock(path, wait=wait) as lock:
        if not lock.held:
            return None
        if not force and (hit := kept(results, cfg, retry_failed=retry_failed, warn=False)):
            return hit  # another process finished it since we looked (maybe while we waited)
        record = compute(cfg, device=device, data_root=data_root, progress=progress,
                         record_config_errors=record_config_errors, execute=execute)
        write_json(path, record)
    return record


def compute(cfg: RunConfig, *, device: str | None = None, data_root: str | None = None,
            progress: bool = False, record_config_errors: bool = False,
            execute: Callable[[RunConfig], Any] | None = None) -> dict:
    """Run ``cfg`` and return its record, writing nothing (see :func:`run`)."""
    from fedtune_core.errors import ConfigError

    started, t0 = datetime.now(UTC), time.perf_counter()
    record: dict[str, Any] = {"schema": SCHEMA, "hash": cfg.hash, "config": cfg.to_dict(),
                              "seed": cfg.seed, "engine": cfg.engine,
                              "started": started.isoformat(timespec="seconds")}
    try:
        out = (execute or _engine(cfg, device, data_root, progress))(cfg)
        _check_finite(out.rows, out.final)
    except ConfigError as err:
        if not record_config_errors:
            raise
        record |= _failure(err)
    except Exception as err:  # recorded, so the rest of a grid goes on
        record |= _failure(err)
    else:
        record |= {"status": "ok", "error": None, "failure": None, "rounds": out.rows,
                   "final": out.final, "params": {"trainable": out.trainable, "total": out.total},
                   "state_bytes": out.state_bytes,
                   "weights": out.weights,
                   "device": out.device}
        if out.rehearsal is not None:  # a rehearsal run: seconds per step, peak memory
            record["rehearsal"] = out.rehearsal
    return record | environment() | {"wall_seconds": time.perf_counter() - t0}


def _engine(cfg: RunConfig, device: str | None, data_root: str | None,
            progress: bool) -> Callable[[RunConfig], Any]:
    """What computes ``cfg``'s outcome: the built-in loop, or Flower's simulation engine,
    handed the checkpoint file that recipe weights resolve to (built on first use), so the
    federated core never reaches up into pre-training.

    Raises:
        ConfigError: engine ``flower`` without Flower installed.
    """
    from fedtune_core.errors import ConfigError
    from fedtune_core.proxy import pretrain

    if cfg.engine == "builtin":
        from fedtune_core.fl import fedavg as engine
    elif importlib.util.find_spec("flwr") is None:
        raise ConfigError(f"engine {cfg.engine!r} needs Flower, which is not installed here: "
                          "pip install -e '.[flower]' (or use engine 'builtin')")
    else:
        from fedtune_core.fl import flower_app as engine  # the optional extra: when asked

    path = pretrain.weights_file(cfg.model, cfg.weights, progress=progress)
    return functools.partial(engine.execute, device=device, data_root=data_root,
                             progress=progress, weights_file=path)


def failed_record(cfg: RunConfig, error: str, seconds: float | None = None) -> dict:
    """The record of a run whose process died before it could report (killed, crashed).

    Built by the driver, which knows the config and how the worker ended (``error``). Such
    a failure is the environment's, so the next grid call runs it again (:func:`kept`).
    """
    started = datetime.now(UTC).isoformat(timespec="seconds")
    return ({"schema": SCHEMA, "hash": cfg.hash, "config": cfg.to_dict(), "seed": cfg.seed,
             "engine": cfg.engine, "started": started, "status": "failed", "error": error,
             "traceback": None, "failure": "error", "rounds": [], "final": {}}
            | environment() | {"wall_seconds": seconds})


def _check_finite(rows: list[dict], final: dict) -> None:
    """Raise :class:`Diverged` at the first non-finite metric (a safety net under the loop)."""
    last = rows[-1]["round"] if rows else 0
    for row in [*rows, final]:
        for key, value in row.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise Diverged(row.get("round", last), key, value)


def _failure(err: BaseException) -> dict[str, Any]:
    tail = "".join(traceback.format_exception(err)[-3:])
    out = {"status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": tail,
           "failure": "error", "rounds": [], "final": {}}
    if isinstance(err, Diverged):
        out |= {"error": str(err), "failure": "diverged", "diverged_round": err.round}
    return out


def load_records(results: str | os.PathLike, status: str | None = "ok") -> list[dict]:
    """Every valid record under ``<results>/runs`` (only ``status`` ones unless None).

    Invalid ones are skipped, each named once in a warning line.
    """
    records = (read_record(p) for p in sorted(Path(results, "runs").glob("*.json")))
    return [r for r in records if r and (status is None or r.get("status") == status)]


def _flatten(rec: dict) -> dict[str, Any]:
    cfg = rec["config"]
    flat = {k: v for k, v in cfg.items() if k != "method_options"}
    flat |= {f"opt_{k}": v for k, v in cfg["method_options"].items()}
    flat["variant"] = method_label(cfg)
    flat |= {"hash": rec["hash"], "status": rec["status"]}
    return flat


def method_label(cfg: dict) -> str:
    """A short display name of the method and its non-default options (e.g. ``prompt-deep``)."""
    from fedtune_core import tuning

    defaults = tuning.method_config(cfg["method"]).__dict__
    extra = [str(v) for k, v in cfg["method_options"].items() if defaults.get(k) != v]
    return "-".join([cfg["method"], *extra])


def runs_frame(records: Iterable[dict]):
    """One row per run: the config's fields, final metrics, parameter counts."""
    import pandas as pd

    rows = []
    for rec in records:
        rows.append(_flatten(rec) | {f"final_{k}": v for k, v in rec.get("final", {}).items()}
                    | {"trainable": rec.get("params", {}).get("trainable"),
                       "total": rec.get("params", {}).get("total"),
                       "wall_seconds": rec.get("wall_seconds")})
    return pd.DataFrame(rows)


def rounds_frame(records: Iterable[dict]):
    """One row per (run, round): the config's fields and that round's metrics."""
    import pandas as pd

    rows = [_flatten(rec) | row for rec in records for row in rec.get("rounds", [])]
    return pd.DataFrame(rows)


"""What a run's record holds, computed without writing it: outcome or failure, provenance.

:func:`compute` runs a config on its engine (the built-in loop or Flower, handed the
checkpoint that recipe weights resolve to) and returns its record: config and hash, status
(``ok``, or ``failed`` with its error, ``failure: "diverged"`` or ``"error"``), per-round and
final metrics, parameters, bytes, weights, versions, commit, hardware and timings. Where
records live and how they are read and written is :mod:`fedtune_core.runs.store`; the one
path from a config to its written record is :mod:`fedtune_core.runs.claims`.
"""

from __future__ import annotations

import functools
import importlib.util
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from fedtune_core.config import RunConfig
from fedtune_core.errors import Diverged, check_finite
from fedtune_core.runs import store
from fedtune_core.runs.provenance import environment

SCHEMA = store.SCHEMA


def compute(cfg: RunConfig, *, device: str | None = None, data_root: str | None = None,
            progress: bool = False, record_config_errors: bool = False,
            execute: Callable[[RunConfig], Any] | None = None) -> dict:
    """Run ``cfg`` and return its record, writing nothing (see
    :func:`fedtune_core.runs.claims.run`)."""
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
        from fedtune_core.fl import builtin as engine
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
    a failure is the environment's, so the next grid call runs it again
    (:func:`fedtune_core.runs.store.kept`).
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
        check_finite(row.get("round", last), row)


def _failure(err: BaseException) -> dict[str, Any]:
    tail = "".join(traceback.format_exception(err)[-3:])
    out = {"status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": tail,
           "failure": "error", "rounds": [], "final": {}}
    if isinstance(err, Diverged):
        out |= {"error": str(err), "failure": "diverged", "diverged_round": err.round}
    return out

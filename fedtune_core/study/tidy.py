"""Tidy frames of run records (pandas), one row per run or per round, for reports and plots."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


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

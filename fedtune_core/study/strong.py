"""Each model's strong checkpoint, chosen on validation data only.

Where runs of one model use several checkpoints (random init, weak and strong pre-training),
the claims about pre-trained models are judged on the strong one: the checkpoint whose
linear probe has the best cross-validated accuracy on the training pool
(``weights.probe_val_acc`` of each record, :mod:`fedtune_core.proxy.probe`), never a test metric.
"""

from __future__ import annotations

import math

import pandas as pd


def strong_choice(runs: pd.DataFrame) -> pd.DataFrame:
    """Per model: the strong checkpoint and what chose it (validation only).

    Ranked by ``checkpoint_val`` (the probe's cross-validated accuracy, from each record's
    ``weights`` entry: :func:`fedtune_core.study.report.frames`), then by pre-training steps,
    then by name; random init has no probe score and ranks by steps (0) only.
    """
    rows = []
    if runs.empty or "weights" not in runs:
        return pd.DataFrame(rows)
    for model, part in runs.groupby("model", sort=False):
        cols = [c for c in ("checkpoint_val", "checkpoint_steps") if c in part]
        score = part.groupby("weights")[cols].first() if cols else pd.DataFrame(
            index=sorted(set(part["weights"])))
        key = {w: (_num(score, w, "checkpoint_val"), _num(score, w, "checkpoint_steps"), w)
               for w in score.index}
        best = max(sorted(key), key=lambda w: key[w][:2])
        val = key[best][0]
        rows.append({"model": model, "weights": best,
                     "chosen by": ("probe cross-validated accuracy (training pool)"
                                   if val > -math.inf else "pre-training steps (no probe score)"
                                   if key[best][1] > -math.inf else "only / first checkpoint"),
                     "validation score": val if val > -math.inf else float("nan"),
                     "checkpoints": len(key)})
    return pd.DataFrame(rows)


def _num(frame: pd.DataFrame, row: str, col: str) -> float:
    value = frame.at[row, col] if col in frame else None
    return float(value) if value is not None and pd.notna(value) else -math.inf


def strong_only(runs: pd.DataFrame) -> pd.DataFrame:
    """Keep each model's strong checkpoint (:func:`strong_choice`, validation only)."""
    if runs.empty or "weights" not in runs:
        return runs
    chosen = strong_choice(runs)
    keep = runs.set_index(["model", "weights"]).index.isin(
        list(zip(chosen["model"], chosen["weights"], strict=True)))
    return runs[keep]



def strong_choices(runs: pd.DataFrame) -> pd.DataFrame:
    """Each model's strong checkpoint as a reader names it, and the validation score that
    chose it (:func:`strong_choice`)."""
    table = strong_choice(runs)
    if table.empty:
        return table
    names = runs.drop_duplicates("weights").set_index("weights")[_label_column(runs)]
    table.insert(1, "strong checkpoint", table.pop("weights").map(names).astype(str))
    return table


def _label_column(runs: pd.DataFrame) -> str:
    return "checkpoint" if "checkpoint" in runs else "weights"

"""One definition per metric: what figures, tables, verdicts and notebooks all compute.

* **final accuracy**: accuracy on the global test set after the last round (``final_test_acc``
  of a run's record), per run;
* **train-test gap**: accuracy on the clients' own training data minus accuracy on their own
  test splits after the last round, per run (a taller gap over-fits more);
* **rounds to target**: the first evaluated round whose test accuracy reaches the target. A
  run that never reaches it is *censored*: it counts as its last evaluated round + 1 (the
  least it could have needed), never as missing, so a method that often fails to get there
  is not flattered by averaging only its lucky seeds. The target is
  :data:`TARGET_FRACTION` of the best method's mean final accuracy in the same setting,
  unrounded (a threshold applied equally to every method, not a selection among runs).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

FINAL = "final_test_acc"  # the column of final accuracy in runs frames
TARGET_FRACTION = 0.8  # rounds to reach this share of the best method's final accuracy


def train_test_gap(runs: pd.DataFrame) -> pd.Series:
    """Training minus own-test accuracy on the clients' data, after the last round, per run."""
    return runs["final_train_acc"] - runs["final_local_test_acc"]


def with_gap(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with a ``gap`` column (:func:`train_test_gap`)."""
    return runs.assign(gap=train_test_gap(runs))


def target_accuracy(runs: pd.DataFrame, by: str = "variant") -> float:
    """:data:`TARGET_FRACTION` of the best ``by`` group's mean final accuracy in ``runs``."""
    return TARGET_FRACTION * float(runs.groupby(by, observed=True)[FINAL].mean().max())


def rounds_to_target(rounds: pd.DataFrame, target: float,
                     by: Sequence[str] = ("variant",)) -> pd.Series:
    """Per (``by``..., seed): the first round with test accuracy >= ``target``.

    Never reached: the last evaluated round + 1 (censored, see the module docstring).
    """
    keys = [*by, "seed"]
    evaluated = rounds.dropna(subset=["test_acc"])
    last = int(evaluated["round"].max())
    hit = evaluated[evaluated["test_acc"] >= target].groupby(keys)["round"].min()
    every = evaluated[keys].drop_duplicates().set_index(keys).index
    return hit.reindex(every).fillna(last + 1).rename("rounds_to_target")


def rounds_to_target_table(rounds: pd.DataFrame, target: float,
                           by: Sequence[str] = ("variant",)) -> pd.DataFrame:
    """Per ``by`` group: mean rounds to target over seeds, seeds that reached it, seeds."""
    evaluated = rounds.dropna(subset=["test_acc"])
    last = int(evaluated["round"].max())
    reach = rounds_to_target(evaluated, target, by).reset_index()
    table = reach.groupby(list(by), sort=False)["rounds_to_target"].agg(
        mean="mean", reached=lambda s: int((s <= last).sum()), seeds="size")
    return table.reset_index()

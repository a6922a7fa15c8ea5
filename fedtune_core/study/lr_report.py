"""Report tables of the learning-rate selection: each sweep, each choice, their cost.

Read from run records only (the sweep runs' validation metrics); re-exported by
:mod:`fedtune_core.study.report`, where the notebooks find them.
"""

from __future__ import annotations

import os

import pandas as pd

from fedtune_core import specs
from fedtune_core.config import RunConfig
from fedtune_core.runs import store
from fedtune_core.study import selection, tidy
from fedtune_core.study.profile import Profile


def lr_sweeps(profile: Profile, folder: str | os.PathLike) -> pd.DataFrame:
    """One row per learning-rate sweep run: its group, rate, validation metrics, cost.

    ``chosen`` marks the group's winner; groups whose sweep is incomplete show ``pending``
    for the runs without a record; ``extension`` marks the rates added past an edge winner.
    Only validation metrics exist in these runs (the test sets are never evaluated).
    """
    choices = selection.decide(profile.groups(), folder)
    rows = []
    for group in profile.groups():
        choice = choices.get(group.key)
        group = choice.group if choice else selection.extend(group, folder)
        scores = choice.scores if choice else _pending_scores(group, folder)
        for score in scores:
            rows.append(_group_columns(group) | {
                "lr": score["lr"], "extension": score["lr"] in group.extensions,
                "val_acc": score.get("val_acc"),
                "val_loss": score.get("val_loss"), "status": score["status"],
                "chosen": bool(choice and choice.lr == score["lr"]),
                "seconds": score.get("wall_seconds"), "samples": score.get("samples")})
    return pd.DataFrame(rows)


def _pending_scores(group: selection.Group, folder: str | os.PathLike) -> list[dict]:
    """Scores of an incomplete sweep: the finished runs' own, ``pending`` for the rest."""
    records = [store.read_record(store.record_path(folder, c), warn=False)
               for c in group.sweeps]
    done = selection.choose([r for r in records if r])[1] if any(records) else []
    by_lr = {s["lr"]: s for s in done}
    return [by_lr.get(r, {"lr": r, "status": "pending"}) for r in group.candidates]


def lr_choices(profile: Profile, folder: str | os.PathLike) -> pd.DataFrame:
    """One row per group: validation accuracy per candidate, the chosen rate, the cost.

    ``sweep`` says ``done``, ``pending`` (a sweep run has no record yet) or ``no rate``
    (every sweep run failed). ``at edge`` is True when the chosen rate is the smallest or
    largest candidate: the best rate may lie outside the grid, which a wider grid would
    show; ``extended`` names the rates added past an edge winner before the choice was
    final (at most ``[lr_selection] extend`` of them) and what they cost.
    """
    sweeps = lr_sweeps(profile, folder)
    if sweeps.empty:
        return sweeps
    rows = []
    for _, part in sweeps.groupby("group", sort=False):
        part = part.sort_values("lr")
        won = part[part["chosen"]]
        lr = float(won["lr"].iloc[0]) if len(won) else float("nan")
        state = ("pending" if (part["status"] == "pending").any()
                 else "done" if len(won) else "no rate")
        rows.append(part.iloc[0][["dataset", "model", "weights", "variant", "optimizer"]]
                    .to_dict() | {
            "val acc by lr": " | ".join(
                f"{r:g}: " + (f"{a:.3f}" if pd.notna(a) else st)
                for r, a, st in zip(part["lr"], part["val_acc"], part["status"], strict=True)),
            "sweep": state, "chosen lr": lr,
            "val acc": won["val_acc"].iloc[0] if len(won) else float("nan"),
            "at edge": lr in (part["lr"].iloc[0], part["lr"].iloc[-1]) if len(won) else None,
            "extended": _extended(part),
            "sweep runs": len(part), "sweep seconds": part["seconds"].sum(min_count=1)})
    return pd.DataFrame(rows)


def lr_cost(profile: Profile, folder: str | os.PathLike) -> str:
    """One Markdown sentence: what the learning-rate selection did and what it cost."""
    sweeps = lr_sweeps(profile, folder)
    if sweeps.empty:
        return "This profile selects no learning rate: every rate is fixed in the profile."
    settings, done = profile.lr_selection, sweeps[sweeps["status"] != "pending"]
    rates = selection.rates(selection.decide(profile.groups(), folder))
    main = [store.read_record(store.record_path(folder, c)) for c in profile.runs(None, rates)]
    main = [r for r in main if r and r.get("status") == "ok"]
    main_samples = sum((r["final"].get("samples_processed") or 0) for r in main)
    main_seconds = sum(r.get("wall_seconds") or 0 for r in main)
    share = (f" ({done['samples'].sum() / main_samples:.0%} of the {len(main)} main runs' "
             f"samples, {done['seconds'].sum() / main_seconds:.0%} of their time)"
             if main_samples and main_seconds else "")
    seed = profile.seeds[0] if settings.seed is None else settings.seed
    rounds = settings.rounds or profile.base.get("rounds", RunConfig.rounds)
    return (f"Learning rates chosen on validation data for {sweeps['group'].nunique()} "
            f"groups: {len(sweeps)} sweep runs ({len(done)} done) of {rounds} "
            f"round{'s' if rounds != 1 else ''} on seed {seed}, validating on "
            f"{settings.val_fraction:.0%} of each client's training split; they took "
            f"{done['seconds'].sum():.0f} s and processed "
            f"{done['samples'].sum():,.0f} samples{share}.{_extension_cost(sweeps)}")


def _extension_cost(sweeps: pd.DataFrame) -> str:
    """One sentence on the sweeps extended past an edge winner (empty if none were)."""
    added = sweeps[sweeps["extension"]]
    if added.empty:
        return (" No winner sat at the edge of its candidates, so no sweep was extended."
                if (sweeps["status"] != "pending").all() else "")
    groups, seconds = added["group"].nunique(), added["seconds"].sum()
    return (f" Groups whose winner sat at the edge of their candidates were extended one "
            f"step past it, at most twice: {groups} group(s), {len(added)} extra sweep runs, "
            f"{seconds:.0f} s of the total.")


def _extended(part: pd.DataFrame) -> str:
    """``"+1e-1, +0.333 (2 runs, 12 s)"`` for the rates added past an edge, else ``-``."""
    added = part[part["extension"]]
    if added.empty:
        return "-"
    seconds = added["seconds"].sum(min_count=1)
    cost = f", {seconds:.0f} s" if pd.notna(seconds) else ""
    return (", ".join(f"{r:g}" for r in added["lr"]) + f" ({len(added)} "
            f"run{'s' if len(added) != 1 else ''}{cost})")


def _group_columns(group: selection.Group) -> dict[str, object]:
    fields = group.fields
    return {"group": group.key, "dataset": fields["dataset"], "model": fields["model"],
            "variant": tidy.method_label(fields), "optimizer": fields["optimizer"],
            "weights": specs.split_id(str(fields["weights"]))[0]}  # a recipe, no hash

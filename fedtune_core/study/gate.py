"""Notebooks read; the grid computes: a notebook's records, and what it is missing.

A notebook computes missing runs only when its ``compute`` parameter says so; otherwise it
renders the records that exist and says which runs have none (``fedtune grid`` or
``./run_all.sh`` computes them).
"""

from __future__ import annotations

import os

from fedtune_core.config import RunConfig
from fedtune_core.study import grid, selection
from fedtune_core.study.profile import Profile


def records(profile: Profile, folder: str | os.PathLike, experiment: str | None = None,
            compute: bool = False, **ensure) -> list[dict]:
    """The records of ``experiment`` (all if None): computed first only if ``compute``.

    ``ensure`` goes to :func:`fedtune_core.study.grid.ensure` (device, jobs, data_root ...).
    """
    if compute:
        return grid.ensure(profile, folder, experiment, **ensure)
    return grid.collect(profile, folder, experiment)


def missing(profile: Profile, folder: str | os.PathLike,
            experiment: str | None = None) -> dict[str, list[RunConfig]]:
    """Runs without a record that spares them: sweeps, main runs, runs waiting for a rate."""
    from fedtune_core.runs import store

    def absent(cfgs: list[RunConfig]) -> list[RunConfig]:
        return [c for c in cfgs if store.kept(folder, c, warn=False) is None]

    chosen = grid.rates(profile, folder, experiment)
    return {"learning-rate sweep runs": absent(selection.sweeps(profile.groups(experiment),
                                                                folder)),
            "runs": absent(profile.runs(experiment, chosen)),
            "runs waiting for their learning rate": profile.pending(experiment, chosen)}


def missing_markdown(profile: Profile, folder: str | os.PathLike,
                     experiment: str | None = None, shown: int = 5) -> str:
    """A Markdown note on the missing runs (empty when none is): counts, the first few, and
    the command that computes them."""
    gaps = missing(profile, folder, experiment)
    total = sum(len(v) for v in gaps.values())
    if not total:
        return ""
    counts = ", ".join(f"{len(v)} {k}" for k, v in gaps.items() if v)
    first = [c for v in gaps.values() for c in v][:shown]
    where = f" --experiment {experiment}" if experiment else ""
    lines = [f"**{total} runs of this report have no record yet** ({counts}); this page "
             f"shows what exists. Compute them with `fedtune grid --profile {profile.name}"
             f"{where}` (or `./run_all.sh --profile {profile.name}`), or run this notebook "
             "with `compute = True`. The first of them:", ""]
    lines += [f"- {c.model} / {c.method}, {c.dataset}, {c.partition}, {c.mode}, seed "
              f"{c.seed}, lr {'pending' if c.lr is None else f'{c.lr:g}'}" for c in first]
    return "\n".join(lines)

"""A grid's pre-training as steps of its run session: the glyph corpus, then each missing
checkpoint, built by the same workers as the runs (:class:`fedtune_core.runs.backends.Step`),
so that runs needing no checkpoint (random init) fill the workers pre-training leaves idle,
and a run starts the moment its own checkpoint is there."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

from fedtune_core import recipes
from fedtune_core.config import RunConfig
from fedtune_core.proxy import pretrain
from fedtune_core.runs.backends import Step

log = logging.getLogger(__name__)  # fedtune grid prints fedtune_core's info messages


def steps(building: list[tuple[str, str]], progress: bool, jobs: int) -> Callable[[], dict]:
    """The steps that pre-train ``building`` (``(model, recipe)`` pairs): a function that
    gives them, not done yet, as keyword arguments of
    :meth:`~fedtune_core.runs.backends.Session.run` (a second call of the same runs, for
    those another process held, gets only what is left). Each glyph corpus comes first,
    then the checkpoints, longest first; each run needs its checkpoint's step."""
    if not building:
        return dict
    building = pretrain.longest_first(building)
    log.info("pre-training: %d checkpoints to build (%s), alongside the runs that need none, "
             "%d at a time", len(building), ", ".join(f"{m} {n}" for m, n in building), jobs)
    t0 = time.perf_counter()
    corpora = {c: Step(functools.partial(pretrain.make_corpus, c, progress),
                       f"generating the glyph corpus {c.hash}")
               for c in dict.fromkeys(recipes.named(n).corpus for _, n in building)}
    builds = {(m, n): Step(functools.partial(pretrain.ensure, m, n, progress=progress,
                                             position=i + 1),
                           f"pre-training {m} {n}", (corpora[recipes.named(n).corpus],))
              for i, (m, n) in enumerate(building)}
    left = set(builds.values()) | set(corpora.values())

    def done(step: Step, value) -> None:
        left.discard(step)
        if isinstance(value, dict):  # a checkpoint's sidecar
            log.info("pre-training: %s", pretrain.summary(value, "built"))
        if not left:  # the phase marker that benchmarks/demo_time.py reads
            log.info("pre-training: done in %.0f s", time.perf_counter() - t0)

    def needs(cfg: RunConfig) -> Step | None:
        pair = recipes.needed([(cfg.model, cfg.weights)])
        return builds.get(pair[0]) if pair else None

    def left_to_do() -> dict:  # the steps not done yet, for each call
        return {"steps": [s for s in [*corpora.values(), *builds.values()] if s in left],
                "needs": needs, "step_done": done}

    return left_to_do

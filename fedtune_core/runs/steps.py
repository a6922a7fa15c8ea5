"""What a backend's workers do besides runs, and the order of it all: :class:`Step` s (work
that some runs need first, such as pre-training a checkpoint) and the :class:`Queue` that
hands out steps and runs, each once what it needs is done."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fedtune_core.config import RunConfig

Claim = Callable[[RunConfig], bool]  # called just before a run starts; False: skip it


@dataclass(frozen=True, eq=False)
class Step:
    """Work that some runs need done before they start (a checkpoint to pre-train), done by
    the same workers as the runs, in their gaps: ``job()`` in a worker (picklable: a
    module-level function or a partial of one), after the steps of ``after``. Compared by
    identity. A step that raises stops the grid with its error."""

    job: Callable[[], Any]
    name: str  # for messages: "pre-training clip-tiny glyphs-strong"
    after: tuple[Step, ...] = ()


class StepFailed(RuntimeError):
    """A step raised, or its worker died: the runs that need it cannot start."""


class Queue:
    """The steps and runs still to start, each once what it needs is done; runs are claimed
    as they are taken (see :meth:`Session.run`). Order: as given, steps before runs."""

    def __init__(self, cfgs: Sequence[RunConfig], claim: Claim, steps: Sequence[Step] = (),
                 needs: Callable[[RunConfig], Step | None] | None = None,
                 step_done: Callable[[Step, Any], Any] | None = None):
        self.claim, self.step_done = claim, step_done or (lambda step, value: None)
        self.open = set(steps)  # steps not done yet
        # what waits for a step: (position, item, the other steps it waits for)
        self.waiting: dict[Step, list[tuple[int, Any, tuple[Step, ...]]]] = {}
        self.ready: list[tuple[int, Any]] = []  # a heap by position
        for i, item in enumerate([*steps, *cfgs]):
            if isinstance(item, Step):
                blockers = [s for s in item.after if s in self.open]
            else:
                blockers = [s] if needs and (s := needs(item)) in self.open else []
            self._add(i, item, blockers)

    def _add(self, i: int, item: Any, blockers: list[Step]) -> None:
        if blockers:  # released by the first of them; the rest are checked again then
            self.waiting.setdefault(blockers[0], []).append((i, item, tuple(blockers[1:])))
        else:
            heapq.heappush(self.ready, (i, item))

    def __len__(self) -> int:
        """Steps and runs not taken yet, ready or waiting."""
        return len(self.ready) + sum(len(items) for items in self.waiting.values())

    def take(self) -> RunConfig | Step | None:
        """The next step or run (a run its claim accepts) that can start now; None when
        there is none (the rest waits for steps under way, or nothing is left)."""
        while self.ready:
            _, item = heapq.heappop(self.ready)
            if isinstance(item, Step) or self.claim(item):
                return item
        return None

    def done(self, step: Step, outcome: tuple[bool, Any]) -> None:
        """``step`` has ended (``(ok, value or error)``): release what waited for it."""
        ok, value = outcome
        if not ok:
            raise StepFailed(f"{step.name} failed: {value}")
        self.open.discard(step)
        self.step_done(step, value)
        for i, item, rest in self.waiting.pop(step, []):
            self._add(i, item, [s for s in rest if s in self.open])


def do_step(step: Step) -> tuple[bool, Any]:
    """Do a step's job: ``(True, what it returned)`` or ``(False, its error)``."""
    try:
        return True, step.job()
    except Exception as err:  # reported to the driver, which stops the grid with it
        return False, f"{type(err).__name__}: {err}"

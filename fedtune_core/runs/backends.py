"""Where runs execute: a backend takes configs and hands back records; the driver writes them.

:func:`run` yields ``(config, record)`` as each run ends, whichever backend ran it; a
:class:`Session` does so for every phase of a grid with one set of workers, which also do
the :class:`Step` s that some runs need first (pre-training a checkpoint) in the gaps:

- ``pool``: local worker processes, ``jobs`` at a time (with one job, runs go in this
  process, with a progress bar over their rounds). A worker that dies (killed by a signal,
  out of memory, a segfault) becomes a failed record naming how it ended; a fresh worker
  takes its place and the rest of the grid goes on. On a machine with several GPUs, worker
  ``i`` sees only GPU ``i mod n``.
- ``ray``: one Ray task per run, asking for a fraction of a GPU on CUDA or one CPU, on a
  local Ray instance or a cluster (``address``). Workers compute records and return them,
  so they need no shared file system. A task whose worker dies becomes a failed record.

Records are written by the caller (the driver) alone, atomically; nothing above this module
knows which backend ran.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

from fedtune_core.config import RunConfig
from fedtune_core.errors import ConfigError, check_choice, check_range
from fedtune_core.fl import training as fl
from fedtune_core.runs import pool
from fedtune_core.runs import records as results
from fedtune_core.runs.steps import Claim, Queue, Step, StepFailed, do_step  # noqa: F401

BACKENDS = ("pool", "ray")
RAY_INSTALL = "pip install -e '.[ray]'"
Done = Iterator[tuple[RunConfig, dict]]


@dataclass(frozen=True)
class Placement:
    """How the runs of one grid call execute; the same for every run, never part of a config."""

    device: str | None = None  # auto/None, cpu, cuda (ray: as seen by each worker)
    data_root: str | None = None  # dataset folder, as seen by the workers
    jobs: int = 1  # pool: worker processes; ray: CPUs of a local instance it starts (0: all)
    address: str | None = None  # ray: an existing cluster ("auto", "host:port"); None: local
    gpus_per_run: float = 1.0  # ray on CUDA: the GPU share each run asks for

    def __post_init__(self) -> None:
        check_range("jobs", self.jobs, 0)
        check_range("gpus per run", self.gpus_per_run, 0, 1, low_open=True)


def run(backend: str, cfgs: Sequence[RunConfig], where: Placement, progress: bool = False,
        claim: Claim | None = None, **steps: Any) -> Done:
    """Execute ``cfgs`` on ``backend``; yield each ``(config, record)`` as its run ends (a
    :class:`Session` of one call: see :meth:`Session.run`).

    Raises:
        ConfigError: an unknown backend, or ``ray`` without Ray installed.
    """
    session = Session(backend, where)

    def once() -> Done:
        with session:
            yield from session.run(cfgs, progress, claim, **steps)

    return once()


class Session:
    """A backend for a whole grid: the pool's workers (or one Ray instance) serve every call
    of :meth:`run`, so that a worker imports its libraries and builds a model once, not once
    per phase. Use it as a context manager; :meth:`close` ends the workers.

    Raises:
        ConfigError: an unknown backend, ``ray`` without Ray installed, an address for the
            pool, or a device the Ray backend does not know (one line, before any run).
    """

    def __init__(self, backend: str, where: Placement):
        check_choice("backend", backend, BACKENDS)
        self.backend, self.where = backend, where
        self.workers: list[pool.Worker] = []  # the pool's, started on the first parallel call
        self.ray = None  # the ray module, once this session joined or started an instance
        self.ray_started = False
        if backend == "ray":
            try:
                import ray  # noqa: F401
            except ImportError:
                raise ConfigError(f"the ray backend needs Ray, which is not installed; install "
                                  f"it with {RAY_INSTALL}") from None
            if where.device not in (None, "auto", "cpu", "cuda"):
                raise ConfigError(f"unknown device {where.device!r} for the ray backend (devices "
                                  "are as each worker sees them); valid choices: auto, cpu, cuda")
        elif where.address is not None:
            raise ConfigError(f"--address {where.address!r} is for the ray backend; the pool "
                              "backend runs on this machine (use --backend ray)")

    def run(self, cfgs: Sequence[RunConfig], progress: bool = False, claim: Claim | None = None,
            *, steps: Sequence[Step] = (), needs: Callable[[RunConfig], Step | None] | None = None,
            step_done: Callable[[Step, Any], Any] | None = None) -> Done:
        """Execute ``steps`` and ``cfgs``; yield each ``(config, record)`` as its run ends.

        Args:
            cfgs: the runs to compute (the caller has already skipped cached ones), in the
                order they should start.
            progress: a bar over each run's rounds where runs go one at a time here.
            claim: asked about each run just before it starts (the driver takes its lock
                there); a run it refuses is skipped and yields nothing.
            steps: work some runs need first (see :class:`Step`); each starts before any run
                once the steps it comes after are done.
            needs: the step a run must wait for (None: it can start now).
            step_done: called here with each step and what its job returned.

        Raises:
            StepFailed: a step raised or its worker died (the runs under way are stopped).
        """
        todo = Queue(cfgs, claim or (lambda cfg: True), steps, needs, step_done)
        if self.backend == "ray":
            return self._ray(todo)
        if self.where.jobs <= 1 or len(todo) <= 1:
            return _here(todo, self.where, progress)
        return self._pool(todo)

    def _pool(self, todo: Queue) -> Done:
        ctx, where = pool.context(self.where.device), self.where
        want = min(where.jobs, len(todo))
        if len(self.workers) < want:  # started before any run of this call is claimed
            gpus = pool.gpu_slots(where.device, where.jobs)
            self.workers += [pool.Worker(ctx, gpus[i]) for i in range(len(self.workers), want)]
        workers = self.workers
        try:
            pool.give_idle(workers, todo, where.device, where.data_root)
            while busy := [w for w in workers if w.task is not None]:
                wait([w.conn for w in busy] + [w.proc.sentinel for w in busy])
                for i, w in enumerate(workers):
                    if w.task is None or (out := w.result()) is None:
                        continue
                    task, w.task = w.task, None
                    if not w.proc.is_alive():  # spawned: no fork holding the driver's run locks
                        w.stop()
                        workers[i] = pool.Worker(mp.get_context("spawn"), w.gpu)
                    if isinstance(task, Step):
                        todo.done(task, out)
                    else:
                        yield task, out
                pool.give_idle(workers, todo, where.device, where.data_root)
        finally:  # an interrupted call: the workers still busy are stopped, the rest kept
            for w in workers:
                if w.task is not None:
                    w.stop()
            self.workers = [w for w in workers if w.task is None]

    def _ray(self, todo: Queue) -> Done:
        import ray

        if self.ray is None:
            self.ray_started = not ray.is_initialized()
            if self.ray_started:
                where = self.where
                local = {"num_cpus": where.jobs or None} if where.address is None else {}
                ray.init(address=where.address, include_dashboard=False, log_to_driver=False,
                         **local)
            self.ray = ray
        return _ray_tasks(ray, todo, self.where)

    def close(self) -> None:
        """End the pool's workers, or the Ray instance this session started."""
        for w in self.workers:
            w.stop()
        self.workers = []
        if self.ray is not None and self.ray_started:
            self.ray.shutdown()
        self.ray = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _here(todo: Queue, where: Placement, progress: bool) -> Done:
    """One at a time in this process (a step's error is raised as it is)."""
    while (task := todo.take()) is not None:
        if isinstance(task, Step):
            todo.done(task, (True, task.job()))
        else:
            yield task, pool.work(task, where.device, where.data_root, progress)


# ---- Ray ------------------------------------------------------------------------------

def _ray_task(cfg: RunConfig, device: str | None, data_root: str | None) -> dict:
    fl.set_cpu_threads()
    return pool.work(cfg, device, data_root)


def _ray_step(step: Step) -> tuple[bool, Any]:
    fl.set_cpu_threads()
    return do_step(step)


def _ray_tasks(ray, todo: Queue, where: Placement) -> Done:
    """Tasks in a window of twice the cluster's CPUs: runs are claimed as they enter it."""
    resources = ray.cluster_resources()
    gpus, window = resources.get("GPU", 0), max(4, 2 * int(resources.get("CPU", 2)))
    if where.device == "cuda" and not gpus:
        raise ConfigError("device 'cuda' but the Ray cluster has no GPU; valid choices: "
                          "auto, cpu")
    need = {"num_cpus": 1}
    if gpus and where.device != "cpu":
        need["num_gpus"] = where.gpus_per_run
    env = {k: v for k, v in os.environ.items() if k.startswith("FEDTUNE_") or k.startswith("HF_")}
    options = dict(max_retries=0, runtime_env={"env_vars": env}, **need)
    task = ray.remote(_ray_task).options(**options)
    step_task = ray.remote(_ray_step).options(**options)
    pending: dict = {}
    try:
        while True:
            while len(pending) < window and (item := todo.take()) is not None:
                pending[step_task.remote(item) if isinstance(item, Step)
                        else task.remote(item, where.device, where.data_root)] = item
            if not pending:
                break
            done, _ = ray.wait(list(pending), num_returns=1)
            item = pending.pop(done[0])
            try:
                out = ray.get(done[0])
            except ray.exceptions.RayError as err:  # the worker died, or Ray lost the task
                out = ((False, _ray_death(err)) if isinstance(item, Step)
                       else results.failed_record(item, _ray_death(err)))
            if isinstance(item, Step):
                todo.done(item, out)
            else:
                yield item, out
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


def _ray_death(err: Exception) -> str:
    first = (str(err).strip().splitlines() or [""])[0]
    return (f"{type(err).__name__}: {first} (the Ray worker running this run died before it "
            "could report: out of memory, a crash, or a kill)")

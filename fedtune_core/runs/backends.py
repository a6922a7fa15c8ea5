"""Where runs execute: a backend takes configs and hands back records; the driver writes them.

:func:`run` yields ``(config, record)`` as each run ends, whichever backend ran it:

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
import pickle
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait

from fedtune_core.config import RunConfig
from fedtune_core.errors import ConfigError, check_choice, check_range
from fedtune_core.fl import builtin
from fedtune_core.fl import training as fl
from fedtune_core.runs import records as results

BACKENDS = ("pool", "ray")
RAY_INSTALL = "pip install -e '.[ray]'"
Done = Iterator[tuple[RunConfig, dict]]
Claim = Callable[[RunConfig], bool]  # called just before a run starts; False: skip it


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


def work(cfg: RunConfig, device: str | None, data_root: str | None,
         progress: bool = False) -> dict:
    """Compute the record of one run without writing it: what every worker calls."""
    return results.compute(cfg, device=device, data_root=data_root, progress=progress,
                           record_config_errors=True)


def run(backend: str, cfgs: Sequence[RunConfig], where: Placement, progress: bool = False,
        claim: Claim | None = None) -> Done:
    """Execute ``cfgs`` on ``backend``; yield each ``(config, record)`` as its run ends.

    Args:
        backend: ``pool`` or ``ray``.
        cfgs: the runs to compute (the caller has already skipped cached ones).
        where: device, data folder, parallelism.
        progress: a bar over each run's rounds where runs go one at a time in this process.
        claim: asked about each run just before it starts (the driver takes its lock
            there); a run it refuses is skipped and yields nothing.

    Raises:
        ConfigError: an unknown backend, or ``ray`` without Ray installed.
    """
    check_choice("backend", backend, BACKENDS)
    todo = _Queue(cfgs, claim or (lambda cfg: True))
    if backend == "ray":
        return _ray(todo, where)
    if where.address is not None:
        raise ConfigError(f"--address {where.address!r} is for the ray backend; the pool "
                          "backend runs on this machine (use --backend ray)")
    if where.jobs <= 1 or len(cfgs) <= 1:
        return ((c, work(c, where.device, where.data_root, progress)) for c in todo)
    return _pool(todo, where)


class _Queue:
    """The runs still to start, each claimed as it is taken (see :func:`run`)."""

    def __init__(self, cfgs: Sequence[RunConfig], claim: Claim):
        self.cfgs, self.claim = deque(cfgs), claim

    def __len__(self) -> int:
        return len(self.cfgs)

    def take(self) -> RunConfig | None:
        """The next run its claim accepts; None when there is none left."""
        while self.cfgs:
            if self.claim(cfg := self.cfgs.popleft()):
                return cfg
        return None

    def __iter__(self) -> Iterator[RunConfig]:
        while (cfg := self.take()) is not None:
            yield cfg


# ---- the local pool -------------------------------------------------------------------

def _serve(conn, gpu: str | None) -> None:
    """A pool worker: take configs, send back records, until told to stop or orphaned."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    fl.set_cpu_threads()
    builtin.keep_built_models()  # a worker runs many runs of the same few models
    # tqdm's default lock is a named semaphore that a killed worker would leave behind
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    parent = mp.parent_process()
    if parent is not None:  # a driver killed with -9 takes its workers along
        threading.Thread(target=lambda: (parent.join(), os._exit(1)), daemon=True).start()
    while (task := conn.recv()) is not None:
        conn.send(work(*task))


class _Worker:
    """One worker process, the run it is busy with (or None), and when that run started."""

    def __init__(self, ctx, gpu: str | None):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, gpu), daemon=True)
        self.proc.start()
        child.close()
        self.cfg: RunConfig | None = None
        self.started = 0.0

    def give(self, cfg: RunConfig | None, where: Placement) -> None:
        """Start ``cfg`` on this worker (None: nothing left, stay idle)."""
        self.cfg, self.started = cfg, time.perf_counter()
        if cfg is not None:
            self.conn.send((cfg, where.device, where.data_root))

    def result(self) -> dict | None:
        """The finished run's record; a failed one if the worker died; None while it runs."""
        if self.conn.poll():
            try:
                return self.conn.recv()
            except (EOFError, OSError, pickle.UnpicklingError):  # died before or while sending
                pass
        elif self.proc.is_alive():
            return None
        self.proc.join()
        return results.failed_record(self.cfg, _death(self.proc.exitcode),
                                     time.perf_counter() - self.started)

    def stop(self) -> None:
        if self.proc.is_alive() and self.cfg is None:
            self.conn.send(None)
            self.proc.join(10)
        if self.proc.is_alive():  # busy (the driver is being interrupted) or stuck
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        how = f"was killed by {signal.Signals(-exitcode).name}"
    else:
        how = f"exited with code {exitcode}"
    return (f"WorkerDied: the worker process running this run {how} before it could report "
            "(out of memory, a crash, or a kill)")


def _gpu_slots(device: str | None, jobs: int) -> list[str | None]:
    """Per worker, the GPU it alone may see (round robin), or None: leave devices alone."""
    if device not in (None, "auto", "cuda"):
        return [None] * jobs
    import torch

    count = torch.cuda.device_count()
    if count < 2:
        return [None] * jobs
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(count)]
    return [ids[i % len(ids)] for i in range(jobs)]


def _context(device: str | None):
    """fork for CPU runs: workers share this process's imports (the smoke grid, 2 jobs, took
    23-25 s with fork and 54-56 s with spawn here); spawn for CUDA runs, since CUDA does not
    survive a fork once this process has asked it anything (e.g. is_available())."""
    if "fork" in mp.get_all_start_methods() and fl.pick_device(device).type == "cpu":
        return mp.get_context("fork")
    return mp.get_context("spawn")


def _pool(todo: _Queue, where: Placement) -> Done:
    ctx = _context(where.device)
    gpus = _gpu_slots(where.device, min(where.jobs, len(todo)))
    workers = [_Worker(ctx, gpu) for gpu in gpus]  # started before any run is claimed
    try:
        for w in workers:
            w.give(todo.take(), where)
        while busy := [w for w in workers if w.cfg is not None]:
            wait([w.conn for w in busy] + [w.proc.sentinel for w in busy])
            for i, w in enumerate(workers):
                if w.cfg is None or (record := w.result()) is None:
                    continue
                cfg, w.cfg = w.cfg, None
                if not w.proc.is_alive():  # spawned: no fork holding the driver's run locks
                    w.stop()
                    w = workers[i] = _Worker(mp.get_context("spawn"), gpus[i])
                w.give(todo.take(), where)
                yield cfg, record
    finally:
        for w in workers:
            w.stop()


# ---- Ray ------------------------------------------------------------------------------

def _ray_task(cfg: RunConfig, device: str | None, data_root: str | None) -> dict:
    fl.set_cpu_threads()
    return work(cfg, device, data_root)


def _ray(todo: _Queue, where: Placement) -> Done:
    """Check what can be checked before anything starts, then the generator of records."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"the ray backend needs Ray, which is not installed; install it "
                          f"with {RAY_INSTALL}") from None
    if where.device not in (None, "auto", "cpu", "cuda"):
        raise ConfigError(f"unknown device {where.device!r} for the ray backend (devices are "
                          "as each worker sees them); valid choices: auto, cpu, cuda")
    return _ray_session(ray, todo, where)


def _ray_session(ray, todo: _Queue, where: Placement) -> Done:
    """Join the Ray instance already initialised, or start / connect one and end it after."""
    started = not ray.is_initialized()
    if started:
        local = {"num_cpus": where.jobs or None} if where.address is None else {}
        ray.init(address=where.address, include_dashboard=False, log_to_driver=False,
                 **local)
    try:
        yield from _ray_tasks(ray, todo, where)
    finally:
        if started:
            ray.shutdown()


def _ray_tasks(ray, todo: _Queue, where: Placement) -> Done:
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
    task = ray.remote(_ray_task).options(max_retries=0, runtime_env={"env_vars": env}, **need)
    pending: dict = {}
    try:
        while True:
            while len(pending) < window and (cfg := todo.take()) is not None:
                pending[task.remote(cfg, where.device, where.data_root)] = cfg
            if not pending:
                break
            done, _ = ray.wait(list(pending), num_returns=1)
            cfg = pending.pop(done[0])
            try:
                record = ray.get(done[0])
            except ray.exceptions.RayError as err:  # the worker died, or Ray lost the task
                record = results.failed_record(cfg, _ray_death(err))
            yield cfg, record
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


def _ray_death(err: Exception) -> str:
    first = (str(err).strip().splitlines() or [""])[0]
    return (f"{type(err).__name__}: {first} (the Ray worker running this run died before it "
            "could report: out of memory, a crash, or a kill)")

"""The pool backend's worker processes: each takes steps and configs from the driver over a
pipe and sends back outcomes and records, until told to stop or orphaned. A worker that
dies (killed by a signal, out of memory, a segfault) makes a failed record naming how it
ended. On a machine with several GPUs, worker ``i`` sees only GPU ``i mod n``."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
from typing import Any

from fedtune_core.config import RunConfig
from fedtune_core.fl import builtin
from fedtune_core.fl import training as fl
from fedtune_core.runs import records as results
from fedtune_core.runs.steps import Queue, Step, do_step


def work(cfg: RunConfig, device: str | None, data_root: str | None,
         progress: bool = False) -> dict:
    """Compute the record of one run without writing it: what every worker calls (a pool
    worker, a Ray task, or the driver itself with one job)."""
    return results.compute(cfg, device=device, data_root=data_root, progress=progress,
                           record_config_errors=True)


def give_idle(workers: list[Worker], todo: Queue, device: str | None,
              data_root: str | None) -> None:
    """Every idle worker its next task, while there is one that can start."""
    for w in workers:
        if w.task is None and (task := todo.take()) is not None:
            w.give(task, device, data_root)


def _serve(conn, gpu: str | None) -> None:
    """A pool worker: take steps and configs, send back outcomes and records, until told to
    stop or orphaned."""
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
        conn.send(do_step(task[0]) if isinstance(task[0], Step) else work(*task))


class Worker:
    """One worker process, the step or run it is busy with (or None), and when it started."""

    def __init__(self, ctx, gpu: str | None):
        self.conn, child = ctx.Pipe()
        self.gpu = gpu
        self.proc = ctx.Process(target=_serve, args=(child, gpu), daemon=True)
        self.proc.start()
        child.close()
        self.task: RunConfig | Step | None = None
        self.started = 0.0

    def give(self, task: RunConfig | Step, device: str | None, data_root: str | None) -> None:
        """Start ``task`` on this worker (a run on ``device``, its data in ``data_root``)."""
        self.task, self.started = task, time.perf_counter()
        self.conn.send((task, device, data_root))

    def result(self) -> Any:
        """The finished run's record (a failed one if the worker died) or step's outcome
        (``(False, how)`` if it died); None while it runs."""
        if self.conn.poll():
            try:
                return self.conn.recv()
            except (EOFError, OSError, pickle.UnpicklingError):  # died before or while sending
                pass
        elif self.proc.is_alive():
            return None
        self.proc.join()
        if isinstance(self.task, Step):
            return False, _death(self.proc.exitcode)
        return results.failed_record(self.task, _death(self.proc.exitcode),
                                     time.perf_counter() - self.started)

    def stop(self) -> None:
        if self.proc.is_alive() and self.task is None:
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


def gpu_slots(device: str | None, jobs: int) -> list[str | None]:
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


def context(device: str | None):
    """fork for CPU runs: workers share this process's imports (the smoke grid, 2 jobs, took
    23-25 s with fork and 54-56 s with spawn here); spawn for CUDA runs, since CUDA does not
    survive a fork once this process has asked it anything (e.g. is_available())."""
    if "fork" in mp.get_all_start_methods() and fl.pick_device(device).type == "cpu":
        return mp.get_context("fork")
    return mp.get_context("spawn")

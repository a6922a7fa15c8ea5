"""A rehearsal's caps on a run, and what it measures: seconds per step, peak memory.

A rehearsal (``fedtune grid --rehearse``) runs every shape of a profile once through the
real code path, tiny, like PyTorch Lightning's ``fast_dev_run``: each training call stops
after :attr:`Limits.train_steps` steps and each evaluation reads its first
:attr:`Limits.eval_samples` samples. The caps are not part of a run's config (a rehearsal's
configs are its own, in their own results folder); the grid puts them in the environment
variable :data:`ENV` while it runs a rehearsal profile, so every worker of every backend
(pool processes inherit it, Ray tasks get the driver's ``FEDTUNE_*`` variables) reads them
in :func:`fedtune_core.fl.builtin.execute`.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ENV = "FEDTUNE_REHEARSAL"


@dataclass(frozen=True)
class Limits:
    """How far a rehearsal run goes."""

    train_steps: int = 2  # training steps per training call (a client's round, central's round)
    eval_samples: int = 2  # samples each evaluation reads (the first ones)

    def to_env(self) -> str:
        """The value of :data:`ENV` that :meth:`from_env` reads back."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_env(cls) -> Limits | None:
        """The caps in :data:`ENV`, or None outside a rehearsal."""
        text = os.environ.get(ENV)
        return cls(**json.loads(text)) if text else None


@dataclass
class Meter:
    """Step times, forward throughput and peak memory of one rehearsal run."""

    device: torch.device
    steps: list[float] = field(default_factory=list)  # seconds of every training step
    forward_seconds: float = 0.0  # evaluations and feature caching (no gradients)
    forward_images: int = 0

    def __post_init__(self) -> None:
        reset_peak_memory(self.device)

    def clock(self) -> float:
        """Now, after the device has finished its queued work (CUDA runs asynchronously)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def summary(self, batch_size: int) -> dict:
        """What the record keeps: seconds per step after the first (the warm-up), memory."""
        measured = self.steps[1:]
        peak, how = peak_memory(self.device)
        return {"batch_size": batch_size, "train_steps": len(self.steps),
                "step_seconds": self.steps,
                "s_per_step": statistics.median(measured) if measured else None,
                "s_per_forward_image": (self.forward_seconds / self.forward_images
                                        if self.forward_images else None),
                "peak_memory_bytes": peak, "peak_memory_kind": how}


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak: CUDA's allocator statistics, or this process's peak RSS (Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> tuple[int | None, str]:
    """(bytes, what was measured): CUDA max_memory_allocated, or the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "peak RSS"
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS (process life)"

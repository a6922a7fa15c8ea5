"""Where a record came from: package versions, the git commit, the hardware."""

from __future__ import annotations

import copy
import functools
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("fedtune", "torch", "torchvision", "timm", "open_clip_torch", "peft", "numpy",
            "scikit-learn", "flwr", "ray")


def environment() -> dict[str, Any]:
    """Versions, git commit and hardware, for the record: read once per process (a copy
    each call). A process runs the code it imported when it started, so the commit it saw
    first is the one its records came from; reading it again for every run cost two git
    calls and ten package lookups, about 30 ms a run."""
    return copy.deepcopy(_environment())


@functools.cache
def _environment() -> dict[str, Any]:
    import torch

    versions = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    hardware = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    return {"versions": versions, "git": git_state(), "hardware": hardware}


def git_state() -> dict[str, Any]:
    """Commit and dirty flag of the checkout fedtune runs from (None outside git)."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(dirty) if dirty is not None else None}

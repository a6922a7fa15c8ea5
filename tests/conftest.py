"""Shared test setup: offline hub, no progress bars, tiny configs and a results folder.

The environment variables are set at import time, before anything imports
huggingface_hub (which reads HF_HUB_OFFLINE once, when it is first imported) or torch.
"""

import os
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# One intra-op thread (set before torch is imported; subprocesses inherit it). The models
# under test are tiny, and with 2 OpenMP threads on 2 cores any other busy process makes
# the threads spin-wait at every barrier: measured 150-200 s instead of 3-5 s for the
# 8-round FedAvg test. Override with OMP_NUM_THREADS=N.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Pre-trained checkpoints and glyph corpora go to a temporary cache, never ~/.cache/fedtune
# (set before anything reads it; subprocesses inherit it).
_CACHE = tempfile.TemporaryDirectory(prefix="fedtune-test-cache-")
os.environ["FEDTUNE_CACHE_DIR"] = _CACHE.name

import pytest  # noqa: E402
import torch  # noqa: E402

from fedtune_core.config import RunConfig  # noqa: E402

# The smallest run that still does everything: 2 clients, 2 rounds, tiny ViT on digits.
TINY = dict(model="vit-tiny", weights="none", method="bias", dataset="digits",
            partition="iid", clients=2, sample=2, rounds=2, local_epochs=1, batch_size=64,
            seed=0)


def pytest_collection_modifyitems(items):
    """Slow tests first (otherwise in their order): parallel workers (xdist) start on the
    long tests and end on short ones instead of waiting on one long test at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable


@pytest.fixture
def tiny_config():
    """Factory of tiny, fast RunConfigs: ``tiny_config(method="lora", rounds=1)``."""

    def make(**changes) -> RunConfig:
        return RunConfig(**(TINY | changes))

    return make


@pytest.fixture
def tmp_results(tmp_path):
    """An empty results folder."""
    path = tmp_path / "results"
    path.mkdir()
    return path


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global torch seed."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def run_cli(capsys):
    """``run_cli(argv)``: run ``fedtune argv`` in-process; (exit code, stdout, stderr)."""
    from fedtune_core import cli

    def call(argv) -> tuple[int, str, str]:
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as exc:  # argparse errors
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    return call


# `fedtune ARGV` in a child that stops for good once it has written its AFTER-th run record
# and says "paused": a test that kills it there kills it mid-grid by construction.
_PAUSING_CLI = """
import sys, threading
from pathlib import Path
from fedtune_core import cli
from fedtune_core.runs import store
after, real, written = int(sys.argv[1]), store.write_json, []
def write_json(path, payload):
    real(path, payload)
    if Path(path).parent.name == "runs":
        written.append(path)
        if len(written) == after:
            print("paused", flush=True)
            threading.Event().wait()
store.write_json = write_json
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.fixture
def paused_cli():
    """``paused_cli(argv, after)``: ``fedtune argv`` in a child process, returned once it
    has written ``after`` run records and stopped there (for the test to kill it)."""
    procs = []

    def start(argv, after: int) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", _PAUSING_CLI, str(after),
                                 *map(str, argv)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        procs.append(proc)
        for line in proc.stdout:  # the child's own output, then its signal
            if line.strip() == "paused":
                return proc
        raise AssertionError(f"fedtune {argv} ended with code {proc.wait()} before writing "
                             f"{after} records")

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def start_local_ray():
    """Starts a local Ray instance for one test module (2 CPUs unless ``num_cpus`` says
    otherwise, no dashboard, the workers' output kept from the test's):
    ``start_local_ray(**more ray.init options)``, its GCS address returned; what the backend
    and Flower tests share (the module shuts it down)."""

    def start(**options) -> str:
        import ray

        ray.init(**({"num_cpus": 2} | options), include_dashboard=False, log_to_driver=False)
        return ray.get_runtime_context().gcs_address

    return start

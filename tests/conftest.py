"""Shared test setup: offline hub, no progress bars, tiny configs and a results folder.

The environment variables are set at import time, before anything imports
huggingface_hub (which reads HF_HUB_OFFLINE once, when it is first imported) or torch.
"""

import os
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

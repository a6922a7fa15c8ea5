"""Same recipe, same bytes (issue 19, part 1): the corpus and the pre-trained checkpoint do
not depend on the caller's thread count, and a corpus on disk is used only if its content
matches the sha256 in its sidecar.

The recipe is a test-only one, seconds long.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtune_core import recipes
from fedtune_core.proxy import glyphs, pretrain, probe

SHORT = dataclasses.replace(
    recipes.named("glyphs-weak"), corpus=glyphs.CorpusConfig(size=600, seed=5),
    holdout=60, steps=12, batch_size=32, warmup=3)


@pytest.fixture
def threads():
    """Set torch's intra-op threads as a caller would; restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def no_probe(monkeypatch):
    monkeypatch.setattr(probe, "proxy_quality", lambda model, weights: {"probe_acc": 0.5})


def _sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.parametrize("model", ["vit-tiny", "clip-tiny"])
def test_a_checkpoint_is_the_same_bytes_whatever_the_callers_thread_count(model, threads,
                                                                          no_probe):
    digests = []
    for count in (1, 2, 3):
        threads(count)
        meta = pretrain.ensure(model, "glyphs-weak", SHORT, force=True)
        digests.append(_sha(meta["path"]))
        assert meta["sha256"] == digests[-1]
        assert torch.get_num_threads() == count, "the caller's setting is given back"
    assert len(set(digests)) == 1, digests


def test_the_corpus_is_the_same_bytes_whatever_the_thread_count(threads):
    cfg = glyphs.CorpusConfig(size=300, seed=9)
    images = []
    for count in (1, 2):
        threads(count)
        images.append(glyphs.generate(cfg).images.numpy().tobytes())
    assert images[0] == images[1]


def test_pretraining_pins_its_threads_while_it_runs(threads, monkeypatch):
    seen = []
    step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    threads(2)
    images, labels = glyphs.load(SHORT.corpus)
    pretrain.train("vit-tiny", dataclasses.replace(SHORT, steps=3), images, labels)
    assert seen == [glyphs.THREADS] * 3


def _corpus_files(cfg: glyphs.CorpusConfig) -> tuple[Path, Path, Path]:
    stem = glyphs.files.cache_dir() / "corpus" / f"glyphs-{cfg.hash}"
    return Path(f"{stem}-images.npy"), Path(f"{stem}-labels.npy"), Path(f"{stem}.json")


@pytest.mark.parametrize("damage", ["same shape, other bytes", "sidecar gone", "labels swapped"])
def test_a_damaged_corpus_is_never_used_and_is_rebuilt(damage):
    cfg = glyphs.CorpusConfig(size=235, seed=11)
    good_x, good_y = (np.array(a) for a in glyphs.load(cfg))
    images, labels, sidecar = _corpus_files(cfg)
    assert json.loads(sidecar.read_text())["sha256"][images.name] == _sha(images)
    if damage == "same shape, other bytes":
        x = np.load(images)
        x[0] = 255 - x[0]
        np.save(images, x)
    elif damage == "sidecar gone":
        sidecar.unlink()
    else:
        np.save(labels, good_y[::-1].copy())
    x, y = glyphs.load(cfg)
    assert np.array_equal(x, good_x) and np.array_equal(y, good_y), "rebuilt, not used"
    assert json.loads(sidecar.read_text())["sha256"][images.name] == _sha(images)

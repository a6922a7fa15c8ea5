"""Fashion-MNIST from raw IDX files this test writes itself (the package is never needed)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from fedtune_core.errors import ConfigError
from fedtune_core.fl import data, fashion

TRAIN, TEST = 150, 40  # images per class in the hand-made files (the loader keeps 144 / 36)


def _idx(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: magic 0x00000803 (or 01), big-endian dims, bytes."""
    header = bytes([0, 0, 0x08, array.ndim])
    return header + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()


def _write(folder, compress: bool = False) -> None:
    """IDX files whose every image is filled with its label x 20 + 1, in a shuffled order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for part, per_class in (("train", TRAIN), ("test", TEST)):
        labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), per_class))
        images = np.repeat((labels * 20 + 1)[:, None, None], 28 * 28, axis=1).reshape(-1, 28, 28)
        for name, array in zip(fashion.FILES[part], (images.astype(np.uint8), labels),
                               strict=True):
            blob = _idx(array)
            if compress:
                (folder / f"{name}.gz").write_bytes(gzip.compress(blob))
            else:
                (folder / name).write_bytes(blob)


@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    monkeypatch.setattr(fashion, "DEBIAN", tmp_path / "no-such-package")


def test_torchvision_layout_loads_a_balanced_fixed_subsample(tmp_path, no_debian):
    _write(tmp_path / "FashionMNIST" / "raw")
    ds = data.load("fashion-mnist", tmp_path)
    assert ds.name == "fashion-mnist" and len(ds.class_names) == 10
    assert ds.train.images.shape == (10 * fashion.TRAIN_PER_CLASS, 3, 28, 28)
    assert ds.test.images.shape == (10 * fashion.TEST_PER_CLASS, 3, 28, 28)
    assert ds.train.labels.bincount().tolist() == [fashion.TRAIN_PER_CLASS] * 10
    assert ds.test.labels.bincount().tolist() == [fashion.TEST_PER_CLASS] * 10
    for split in (ds.train, ds.test):  # each image still sits with its own label
        assert (split.images[:, :, 0, 0] == (split.labels * 20 + 1)[:, None]).all()
    again = data.load("fashion-mnist", tmp_path)
    assert (again.train.images == ds.train.images).all()  # drawn with a fixed seed


def test_debian_folder_of_gzipped_files_is_used_when_the_data_dir_has_none(tmp_path,
                                                                           monkeypatch):
    debian = tmp_path / "usr-share-datasets"
    _write(debian, compress=True)
    monkeypatch.setattr(fashion, "DEBIAN", debian)
    empty = tmp_path / "data"
    ds = data.load("fashion-mnist", empty)
    assert ds.train.labels.bincount().tolist() == [fashion.TRAIN_PER_CLASS] * 10
    assert not empty.exists()  # nothing written or downloaded


def test_offline_without_files_is_one_clear_error_leaving_nothing(tmp_path, no_debian,
                                                                  monkeypatch):
    from torchvision import datasets

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(datasets, "FashionMNIST", offline)
    root = tmp_path / "data"
    with pytest.raises(ConfigError, match="dataset-fashion-mnist package"):
        data.load("fashion-mnist", root)
    assert not root.exists()


def test_a_truncated_idx_file_is_named(tmp_path, no_debian):
    raw = tmp_path / "FashionMNIST" / "raw"
    _write(raw)
    path = raw / fashion.FILES["train"][0]
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ConfigError, match="header declares"):
        data.load("fashion-mnist", tmp_path)


def test_fedtune_run_trains_on_fashion_mnist_offline(tmp_path, no_debian, run_cli,
                                                     tmp_results):
    _write(tmp_path / "FashionMNIST" / "raw")
    code, out, err = run_cli(["run", "--model", "vit-tiny", "--weights", "none", "--method",
                              "bias", "--dataset", "fashion-mnist", "--data-dir", tmp_path,
                              "--partition", "iid", "--clients", "2", "--sample", "2",
                              "--rounds", "1", "--batch-size", "64", "--device", "cpu",
                              "--quiet", "--results", tmp_results])
    assert code == 0, err
    record = json.loads(open(out.strip().splitlines()[-1]).read())
    assert record["status"] == "ok" and record["config"]["dataset"] == "fashion-mnist"
    assert record["final"]["test_acc"] > 0.2  # chance is 0.1: each class is one grey level

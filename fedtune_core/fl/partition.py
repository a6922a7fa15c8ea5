"""Splitting a pooled training set across federated clients (pure numpy, seeded).

Partitions: ``iid``, ``dirichlet:ALPHA`` (label skew, Hsu et al. 2019), ``shards:K`` (K
classes per client), ``fewshot:K`` (K images of every class per client).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedtune_core import specs
from fedtune_core.errors import ConfigError, check_range
from fedtune_core.specs import PartitionSpec

if TYPE_CHECKING:
    import pandas

# partitions are parsed on the ground floor (specs), so a config validates without numpy
parse, KINDS, FORMS = specs.parse_partition, specs.PARTITION_KINDS, specs.PARTITION_FORMS
MIN_SIZE = 2  # a client needs a train and a test sample
MAX_TRIES = 100  # dirichlet draws before giving up
Rng = np.random.Generator
Idx = list[np.ndarray]  # one index array per client or class


@dataclass
class ClientSplit:
    """Per-client sorted int64 indices into the pooled labels: train and local test sets."""

    train: list[np.ndarray]
    test: list[np.ndarray]


def _by_class(labels: np.ndarray, classes: int, rng: Rng) -> Idx:
    return [rng.permutation(np.flatnonzero(labels == c)) for c in range(classes)]


def _iid(labels: np.ndarray, _value: None, clients: int, _classes: int, rng: Rng) -> Idx:
    return np.array_split(rng.permutation(len(labels)), clients)


def _dirichlet(labels: np.ndarray, alpha: float, clients: int, classes: int, rng: Rng) -> Idx:
    by_class = _by_class(labels, classes, rng)
    for _ in range(MAX_TRIES):
        # per class: proportions p ~ Dir(alpha), cut its indices at the cumulative shares
        chunks = [np.split(idx, (np.cumsum(rng.dirichlet(alpha * np.ones(clients)))[:-1]
                                 * len(idx)).astype(int)) for idx in by_class]
        shares = [np.concatenate([ch[i] for ch in chunks]) for i in range(clients)]
        if min(len(s) for s in shares) >= MIN_SIZE:
            return shares
    raise ConfigError(f"with dirichlet alpha {alpha} and {clients} clients some client gets "
                      f"fewer than {MIN_SIZE} samples in all {MAX_TRIES} draws; use a larger "
                      f"alpha or fewer clients")


def _shards(labels: np.ndarray, k: int, clients: int, classes: int, rng: Rng) -> Idx:
    if k > classes:
        raise ConfigError(f"shards:{k} needs K <= the number of classes ({classes}), got {k}")
    perm = rng.permutation(classes)
    held = [set(perm[(i * k + np.arange(k)) % classes].tolist()) for i in range(clients)]
    parts: list[Idx] = [[] for _ in range(clients)]
    for c, idx in enumerate(_by_class(labels, classes, rng)):
        own = [i for i in range(clients) if c in held[i]]
        for i, chunk in zip(own, np.array_split(idx, max(len(own), 1)), strict=False):
            parts[i].append(chunk)
    shares = [np.concatenate(p) for p in parts]
    small = [i for i, s in enumerate(shares) if len(s) < MIN_SIZE]
    if small:
        raise ConfigError(f"shards:{k} with {clients} clients gives client {small[0]} fewer "
                          f"than {MIN_SIZE} samples; use fewer clients")
    return shares


def _local_split(share: np.ndarray, fraction: float, rng: Rng) -> tuple[np.ndarray, np.ndarray]:
    idx = rng.permutation(share)
    # round(n * fraction), but at least 1 test (when fraction > 0 and n >= 2) and 1 train
    n_test = min(max(round(len(idx) * fraction), int(fraction > 0)), max(len(idx) - 1, 0))
    return idx[n_test:], idx[:n_test]


def _fewshot(labels: np.ndarray, k: int, clients: int, classes: int, rng: Rng) -> tuple[Idx, Idx]:
    counts = np.bincount(labels, minlength=classes)
    rarest = int(np.argmin(counts))
    if clients * k > counts[rarest]:
        raise ConfigError(f"fewshot:{k} needs {k} images of every class for each of {clients} "
                          f"clients ({clients * k} per class), but class {rarest} has only "
                          f"{counts[rarest]}; use a smaller K or fewer clients")
    by_class = _by_class(labels, classes, rng)
    trains = [np.concatenate([idx[i * k:(i + 1) * k] for idx in by_class]) for i in range(clients)]
    rest = rng.permutation(np.concatenate([idx[clients * k:] for idx in by_class]))
    tests = np.array_split(rest, clients)
    return trains, [t[: len(tr)] for t, tr in zip(tests, trains, strict=True)]


def split_clients(labels: np.ndarray, spec: str | PartitionSpec, clients: int, seed: int,
                  local_test_fraction: float = 0.2, num_classes: int | None = None) -> ClientSplit:
    """Split pooled training labels across clients, each with its own local test split.

    Args:
        labels: 1-D integer class labels of the pooled training data.
        spec: Partition string or parsed :class:`PartitionSpec`.
        clients: Number of clients (>= 1).
        seed: Seed of the one random generator used; same seed, same split.
        local_test_fraction: Share of each client's data held out as its local test split
            (ignored by ``fewshot``, whose test splits come from the unassigned samples).
        num_classes: Number of classes; defaults to ``labels.max() + 1``.

    Returns:
        Sorted int64 indices; train sets disjoint, test sets disjoint and apart from all train.

    Raises:
        ConfigError: On bad arguments, or when the partition leaves a client without data.
    """
    spec = parse(str(spec))
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError("labels must be a non-empty 1-D integer array")
    check_range("clients", clients, low=1)
    check_range("local_test_fraction", local_test_fraction, low=0, high=1)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ConfigError(f"labels must lie in [0, {num_classes}), "
                          f"got {labels.min()}..{labels.max()}")
    rng = np.random.default_rng(seed)
    if spec.kind == "fewshot":
        train, test = _fewshot(labels, spec.value, clients, num_classes, rng)
    else:
        split = {"iid": _iid, "dirichlet": _dirichlet, "shards": _shards}[spec.kind]
        shares = split(labels, spec.value, clients, num_classes, rng)
        train, test = zip(*(_local_split(s, local_test_fraction, rng) for s in shares), strict=True)
    _check_every_client_has_data(spec, clients, len(labels), train, test)
    return ClientSplit(train=[np.sort(t).astype(np.int64) for t in train],
                       test=[np.sort(t).astype(np.int64) for t in test])


def _check_every_client_has_data(spec: PartitionSpec, clients: int, total: int, train: Idx,
                                 test: Idx) -> None:
    """Every client needs a training sample and a test sample (its local test accuracy)."""
    for side, parts in (("training", train), ("test", test)):
        empty = [i for i, t in enumerate(parts) if len(t) == 0]
        if empty:
            hint = ("a smaller K" if spec.kind == "fewshot"
                    else "a larger local_test_fraction" if side == "test" else "another partition")
            raise ConfigError(f"partition {spec} with {clients} clients leaves client {empty[0]} "
                              f"(and {len(empty) - 1} more) without {side} samples ({total} "
                              f"training samples in all; every client needs one to train and "
                              f"one to test on); use fewer clients or {hint}")


def hold_out(train: list[np.ndarray], fraction: float, seed: int) -> ClientSplit:
    """Carve a validation split out of each client's training indices.

    Used by learning-rate sweeps: the validation data come from the training side only, so
    the local and global test sets stay untouched. A client keeps at least one training
    sample; with ``fraction > 0`` and two or more samples it gives at least one.

    Args:
        train: per-client training indices (e.g. :attr:`ClientSplit.train`).
        fraction: share of each client's training samples to hold out (0 <= f < 1).
        seed: run seed; the carve uses its own generator, so the partition is unchanged.

    Returns:
        A :class:`ClientSplit` whose ``train`` is what is left to train on and whose
        ``test`` holds the validation indices.

    Raises:
        ConfigError: a client with fewer than two training samples (nothing to hold out).
    """
    check_range("val_fraction", fraction, low=0, high=1, low_open=True)
    if small := [i for i, t in enumerate(train) if len(t) < 2]:
        raise ConfigError(f"a validation split needs two training samples per client; client "
                          f"{small[0]} has {len(train[small[0]])}; use fewer clients")
    rng = np.random.default_rng([seed, 2])
    kept, held = zip(*(_local_split(t, fraction, rng) for t in train), strict=True)
    return ClientSplit(train=[np.sort(t).astype(np.int64) for t in kept],
                       test=[np.sort(t).astype(np.int64) for t in held])


def count_table(labels: np.ndarray, parts: list[np.ndarray],
                class_names: list[str] | None = None) -> pandas.DataFrame:
    """Per-client class counts, e.g. of :attr:`ClientSplit.train`.

    Returns:
        Rows ``"client 0"``, ...; a column per class (``class_names`` or ids) and ``"total"``.
    """
    import pandas as pd

    labels = np.asarray(labels)
    n = len(class_names) if class_names is not None else int(labels.max(initial=-1)) + 1
    rows = [np.bincount(labels[np.asarray(p, dtype=np.int64)], minlength=n) for p in parts]
    if any(len(r) > n for r in rows):
        raise ConfigError(f"labels exceed the {n} class names given")
    table = pd.DataFrame(np.array(rows, dtype=np.int64).reshape(len(parts), n),
                         index=[f"client {i}" for i in range(len(parts))],
                         columns=list(class_names) if class_names is not None else list(range(n)))
    return table.assign(total=table.sum(axis=1))

"""Tests of fedtune_core.fl.partition: parsing, the four partitions, and the count table."""

import numpy as np
import pytest

from fedtune_core.errors import ConfigError
from fedtune_core.fl.partition import (
    ClientSplit,
    PartitionSpec,
    count_table,
    parse,
    split_clients,
)

LABELS = np.repeat(np.arange(10), 100)  # 10 classes x 100 samples
KINDS = ["iid", "dirichlet:0.5", "shards:2", "fewshot:4"]


def _all(split: ClientSplit) -> list[np.ndarray]:
    return split.train + split.test


def _assert_disjoint(split: ClientSplit) -> None:
    parts = _all(split)
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined), "an index is in two parts"
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0), "parts must be sorted"


def _max_class_share(labels: np.ndarray, split: ClientSplit) -> float:
    shares = []
    for tr, te in zip(split.train, split.test, strict=True):
        counts = np.bincount(labels[np.concatenate([tr, te])], minlength=10)
        shares.append(counts.max() / counts.sum())
    return float(np.mean(shares))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("iid", PartitionSpec("iid", None)),
        ("dirichlet:0.5", PartitionSpec("dirichlet", 0.5)),
        ("dirichlet:3", PartitionSpec("dirichlet", 3.0)),
        ("shards:2", PartitionSpec("shards", 2)),
        ("fewshot:4", PartitionSpec("fewshot", 4)),
    ],
)
def test_parse_valid(text, expected):
    spec = parse(text)
    assert spec == expected
    assert type(spec.value) is type(expected.value)
    assert parse(str(spec)) == spec


@pytest.mark.parametrize(
    ("text", "mentions"),
    [
        ("foo", "'foo'"),
        ("iid:3", "'iid:3'"),
        ("dirichlet", "'dirichlet'"),
        ("dirichlet:", "'dirichlet:'"),
        ("dirichlet:abc", "'dirichlet:abc'"),
        ("dirichlet:nan", "nan"),
        ("shards:0", "got 0"),
        ("shards:1.5", "'shards:1.5'"),
        ("fewshot:x", "'fewshot:x'"),
        ("fewshot:-2", "got -2"),
    ],
)
def test_parse_rejects(text, mentions):
    with pytest.raises(ConfigError) as err:
        parse(text)
    assert mentions in str(err.value)
    assert "\n" not in str(err.value)


def test_parse_unknown_lists_valid_forms():
    with pytest.raises(ConfigError) as err:
        parse("foo")
    assert str(err.value) == (
        "unknown partition 'foo'; valid choices: iid, dirichlet:ALPHA, shards:K, fewshot:K"
    )


@pytest.mark.parametrize(("text", "value"), [("dirichlet:0", "0.0"), ("dirichlet:-1", "-1.0")])
def test_parse_rejects_nonpositive_alpha(text, value):
    with pytest.raises(ConfigError, match=f"^dirichlet alpha must be > 0, got {value}$"):
        parse(text)


@pytest.mark.parametrize("kind", ["iid", "dirichlet:0.5", "dirichlet:0.1"])
def test_iid_and_dirichlet_cover_everything_once(kind):
    split = split_clients(LABELS, kind, clients=10, seed=0)
    _assert_disjoint(split)
    assert np.array_equal(np.sort(np.concatenate(_all(split))), np.arange(len(LABELS)))
    assert all(len(t) >= 1 for t in split.train) and all(len(t) >= 1 for t in split.test)


def test_local_test_fraction():
    split = split_clients(LABELS, "iid", clients=10, seed=0, local_test_fraction=0.2)
    assert [len(t) for t in split.test] == [20] * 10
    assert [len(t) for t in split.train] == [80] * 10
    tiny = split_clients(np.arange(20) % 2, "iid", clients=10, seed=0, local_test_fraction=0.1)
    assert [len(t) for t in tiny.test] == [1] * 10  # round(0.2) = 0, but at least 1 test
    assert [len(t) for t in tiny.train] == [1] * 10


@pytest.mark.parametrize("labels, kind, clients, fraction, side", [
    (LABELS, "iid", 10, 0.0, "test"),  # no local test split at all
    (np.arange(5), "iid", 5, 0.9, "test"),  # one sample each: it trains, nothing to test on
    (np.arange(1437) % 10, "iid", 1000, 0.2, "test"),  # digits' pool, 1000 clients
    (np.arange(3), "iid", 5, 0.2, "training"),  # more clients than samples
])
def test_every_client_needs_a_train_and_a_test_sample(labels, kind, clients, fraction, side):
    with pytest.raises(ConfigError, match=f"without {side} samples") as info:
        split_clients(labels, kind, clients=clients, seed=0, local_test_fraction=fraction)
    assert f"{clients} clients" in str(info.value) and "fewer clients" in str(info.value)


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_given_seed(kind):
    a = split_clients(LABELS, kind, clients=5, seed=1)
    b = split_clients(LABELS, kind, clients=5, seed=1)
    c = split_clients(LABELS, kind, clients=5, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(_all(a), _all(b), strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(_all(a), _all(c), strict=True))


def test_spec_object_same_as_string():
    a = split_clients(LABELS, "shards:3", clients=4, seed=7)
    b = split_clients(LABELS, PartitionSpec("shards", 3), clients=4, seed=7)
    assert all(np.array_equal(x, y) for x, y in zip(_all(a), _all(b), strict=True))


def test_dirichlet_small_alpha_is_skewed():
    iid = _max_class_share(LABELS, split_clients(LABELS, "iid", clients=10, seed=0))
    skewed = _max_class_share(LABELS, split_clients(LABELS, "dirichlet:0.1", clients=10, seed=0))
    mild = _max_class_share(LABELS, split_clients(LABELS, "dirichlet:100", clients=10, seed=0))
    assert iid < 0.25 and mild < 0.3
    assert skewed > 0.5
    assert skewed > 2 * iid


@pytest.mark.parametrize(("clients", "k"), [(10, 2), (10, 3), (3, 2), (4, 1)])
def test_shards_k_classes_per_client(clients, k):
    split = split_clients(LABELS, f"shards:{k}", clients=clients, seed=0)
    _assert_disjoint(split)
    used = set()
    for tr, te in zip(split.train, split.test, strict=True):
        classes = set(np.unique(LABELS[np.concatenate([tr, te])]).tolist())
        assert len(classes) == k
        used |= classes
    assert len(used) == min(clients * k, 10)
    expected = np.flatnonzero(np.isin(LABELS, sorted(used)))
    assert np.array_equal(np.sort(np.concatenate(_all(split))), expected)


def test_shards_k_larger_than_classes():
    with pytest.raises(ConfigError, match="shards:11") as err:
        split_clients(LABELS, "shards:11", clients=2, seed=0)
    assert "10" in str(err.value)


def test_shards_too_many_clients():
    labels = np.repeat(np.arange(10), 3)  # each class split 3 ways: 1 sample per client
    with pytest.raises(ConfigError, match="fewer clients"):
        split_clients(labels, "shards:1", clients=30, seed=0)


def test_fewshot_leaving_no_test_images_is_refused():
    with pytest.raises(ConfigError, match="without test samples.*smaller K"):
        split_clients(LABELS, "fewshot:10", clients=10, seed=0)  # all 1000 images train


@pytest.mark.parametrize("k", [1, 4, 9])
def test_fewshot_k_per_class(k):
    split = split_clients(LABELS, f"fewshot:{k}", clients=10, seed=0, local_test_fraction=0.9)
    _assert_disjoint(split)
    for tr, te in zip(split.train, split.test, strict=True):
        assert np.array_equal(np.bincount(LABELS[tr], minlength=10), np.full(10, k))
        # the 1000 - 100k leftovers go 100 - 10k to each client, capped at len(train) = 10k
        assert len(te) == min(10 * k, 100 - 10 * k)


def test_fewshot_too_large_k():
    counts = np.full(10, 200)
    counts[3] = 144
    labels = np.repeat(np.arange(10), counts)
    with pytest.raises(ConfigError) as err:
        split_clients(labels, "fewshot:16", clients=10, seed=0)
    msg = str(err.value)
    assert "fewshot:16" in msg and "160 per class" in msg and "class 3 has only 144" in msg
    split_clients(labels, "fewshot:14", clients=10, seed=0)  # 140 <= 144 fits


def test_iid_too_many_clients():
    with pytest.raises(ConfigError, match="fewer clients"):
        split_clients(np.arange(5), "iid", clients=6, seed=0)


def test_dirichlet_too_many_clients():
    labels = np.repeat(np.arange(2), 5)  # 10 samples cannot give 10 clients 2 each
    with pytest.raises(ConfigError, match="larger alpha or fewer clients"):
        split_clients(labels, "dirichlet:0.5", clients=10, seed=0)


@pytest.mark.parametrize("clients", [0, -1])
def test_clients_must_be_positive(clients):
    with pytest.raises(ConfigError, match="clients"):
        split_clients(LABELS, "iid", clients=clients, seed=0)


def test_count_table():
    split = split_clients(LABELS, "dirichlet:0.3", clients=4, seed=0)
    names = [f"c{i}" for i in range(10)]
    table = count_table(LABELS, split.train, class_names=names)
    assert list(table.index) == [f"client {i}" for i in range(4)]
    assert list(table.columns) == [*names, "total"]
    assert table["total"].tolist() == [len(t) for t in split.train]
    assert table[names].sum(axis=1).tolist() == [len(t) for t in split.train]
    union = np.concatenate(split.train)
    assert table[names].sum(axis=0).tolist() == np.bincount(LABELS[union], minlength=10).tolist()
    plain = count_table(LABELS, split.test)
    assert list(plain.columns) == [*range(10), "total"]
    assert plain["total"].tolist() == [len(t) for t in split.test]

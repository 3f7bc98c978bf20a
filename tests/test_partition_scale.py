"""Tests for partitioning at simulation scale: thousands of nodes, each with at least min_size examples."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

import clients.data
from clients.data import Dataset, load_dataset, node_data, partition, pooled_train, split_central

POOL = 56_000  # fashion-mnist's pool after the central test split: 10 classes of 5,600


@pytest.fixture(scope="module")
def pool_labels() -> np.ndarray:
    """Return 56,000 shuffled labels of 10 balanced classes, the shape of fashion-mnist's pool."""
    return np.random.default_rng(0).permutation(np.repeat(np.arange(10, dtype=np.int64), POOL // 10))


@pytest.fixture
def fresh_plans(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start the test with no remembered partitionings and an empty disk cache in ``tmp_path``."""
    monkeypatch.setattr(clients.data, "_plans", OrderedDict())
    monkeypatch.setenv("FEDCOMPARE_CACHE_DIR", str(tmp_path))


def old_dirichlet(y: np.ndarray, *, num_partitions: int, alpha: float, min_size: int, seed: int) -> tuple[list, int]:
    """Return the partitions of the redraw-only implementation (before the top-up) and the draws it took."""
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == label) for label in np.unique(y)]
    for draw in range(1, 1001):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for members in by_class:
            members = rng.permutation(members)
            shares = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for node, chunk in enumerate(np.split(members, cuts)):
                parts[node].append(chunk)
        merged = [np.concatenate(chunks) for chunks in parts]
        if min(len(p) for p in merged) >= min_size:
            return [np.sort(p) for p in merged], draw
    raise AssertionError("the old implementation gave up")


def old_node_split(ds: Dataset, *, partition_id: int, **kw) -> tuple[Dataset, Dataset]:
    """Return a node's data the way node_data made it before it remembered partitionings (every node, every call)."""
    derive, split = clients.data._derive_seed, clients.data._split_indices
    pool, _ = split_central(ds, test_fraction=kw["central_test_fraction"], seed=kw["seed"])
    parts = partition(pool.y, num_partitions=kw["num_partitions"], scheme=kw["scheme"], seed=derive(kw["seed"], 2),
                      alpha=kw["alpha"], classes_per_node=kw["classes_per_node"], min_size=kw["min_size"])
    node = pool.subset(parts[partition_id])
    train, test = split(node.y, test_fraction=kw["local_test_fraction"], seed=derive(kw["seed"], 3, partition_id))
    return node.subset(train), node.subset(test)


def same(a: Dataset, b: Dataset) -> bool:
    """Return whether two datasets hold the same features and labels."""
    return np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)


# ------------------------------------------------------------------ partition


@pytest.mark.parametrize(("num_partitions", "min_size"), [(1000, 10), (1000, 40), (10_000, 5)])
def test_dirichlet_at_thousands_of_nodes_gives_every_node_min_size_and_keeps_the_skew(
    pool_labels: np.ndarray, num_partitions: int, min_size: int
) -> None:
    parts = partition(pool_labels, num_partitions=num_partitions, scheme="dirichlet", seed=0, alpha=0.5,
                      min_size=min_size)

    assert len(parts) == num_partitions
    assert min(len(p) for p in parts) >= min_size
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(POOL)), "every position exactly once"
    classes = np.array([len(np.unique(pool_labels[p])) for p in parts])
    top_share = np.array([np.bincount(pool_labels[p]).max() / len(p) for p in parts])
    assert (classes < 10).mean() > 0.5, "most nodes lack some classes"
    assert top_share.mean() > 0.3, "iid would give about 0.1-0.2"


def test_dirichlet_at_scale_is_deterministic_for_a_seed(pool_labels: np.ndarray) -> None:
    kw = dict(num_partitions=1000, scheme="dirichlet", alpha=0.5, min_size=40)
    first, again, other = (partition(pool_labels, seed=s, **kw) for s in (3, 3, 4))

    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize(("num_partitions", "alpha", "min_size", "seed"),
                         [(4, 0.5, 10, 0), (5, 0.5, 10, 3), (20, 0.5, 10, 1), (4, 0.1, 50, 0), (10, 1.0, 20, 7)])
def test_dirichlet_that_succeeds_within_ten_draws_is_unchanged(
    num_partitions: int, alpha: float, min_size: int, seed: int
) -> None:
    rng = np.random.default_rng(0)
    y = rng.choice(10, size=1000, p=np.linspace(1, 2, 10) / np.linspace(1, 2, 10).sum()).astype(np.int64)
    expected, draws = old_dirichlet(y, num_partitions=num_partitions, alpha=alpha, min_size=min_size, seed=seed)
    assert draws <= 10, "a case for the first draws"

    parts = partition(y, num_partitions=num_partitions, scheme="dirichlet", seed=seed, alpha=alpha, min_size=min_size)

    assert all(np.array_equal(a, b) for a, b in zip(parts, expected, strict=True))


def test_iid_and_pathological_at_thousands_of_nodes_fill_every_node_or_say_why(pool_labels: np.ndarray) -> None:
    for scheme in ("iid", "pathological"):
        parts = partition(pool_labels, num_partitions=1000, scheme=scheme, seed=0, min_size=50)
        assert min(len(p) for p in parts) >= 50 and len(np.concatenate(parts)) == POOL, scheme
    iid = partition(pool_labels, num_partitions=10_000, scheme="iid", seed=0, min_size=5)
    assert {len(p) for p in iid} == {5, 6}
    # 20,000 class slots over 10 classes: 5,600 examples shared by 2,000 holders gives chunks of 2 or 3
    with pytest.raises(ValueError, match=r"pathological partition gave a node only 4 examples.*min_partition_size=5"):
        partition(pool_labels, num_partitions=10_000, scheme="pathological", seed=0, min_size=5)


def test_by_column_at_thousands_of_nodes_keeps_each_value_on_one_node() -> None:
    rng = np.random.default_rng(0)
    groups = np.array([f"site{i}" for i in rng.integers(0, 5000, size=20_000)])

    parts = partition(np.zeros(20_000, np.int64), num_partitions=2000, scheme="by-column", seed=0, groups=groups,
                      min_size=1)

    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(20_000))
    held = [set(groups[p]) for p in parts]
    assert sum(len(h) for h in held) == len(set(groups)), "no value on two nodes"


# ------------------------------------------------------------------ node data


@pytest.mark.parametrize("num_partitions", [4, 100])  # 100: past the disk cache's node count, split in-process
def test_node_data_matches_the_partition_of_every_node_at_once(fresh_plans: None, num_partitions: int) -> None:
    digits = load_dataset("digits")
    kw = dict(num_partitions=num_partitions, scheme="dirichlet", seed=7, alpha=0.5, classes_per_node=2,
              central_test_fraction=0.2, local_test_fraction=0.15, min_size=10)

    for partition_id in (0, num_partitions - 1, 1):
        train, test = node_data(digits, partition_id=partition_id, **kw)
        old_train, old_test = old_node_split(digits, partition_id=partition_id, **kw)
        assert same(train, old_train) and same(test, old_test), partition_id
    pooled = pooled_train(load_dataset("digits"), **kw, partition_ids=(2, 0))
    assert same(pooled, clients.data.concatenate([old_node_split(digits, partition_id=i, **kw)[0] for i in (2, 0)]))


def test_node_data_partitions_once_per_process_and_writes_no_file_per_node_at_scale(
    fresh_plans: None, tmp_path: Path
) -> None:
    kw = dict(num_partitions=100, scheme="dirichlet", seed=1, alpha=0.5, classes_per_node=2,
              central_test_fraction=0.2, local_test_fraction=0.15, min_size=10)

    for partition_id in range(100):
        node_data(load_dataset("digits"), partition_id=partition_id, **kw)  # a fresh dataset object each message

    assert len(clients.data._plans) == 1, "one partitioning for the same labels and arguments"
    assert len(list(tmp_path.glob("split-*.npz"))) == 1, "the central split only"
    node_data(load_dataset("digits"), partition_id=0, **{**kw, "seed": 2})
    node_data(load_dataset("digits"), partition_id=0, **{**kw, "seed": 3})
    assert len(clients.data._plans) == 2, "a small LRU"


def test_node_data_splits_nodes_of_two_or_three_examples_and_names_min_size_below(fresh_plans: None) -> None:
    y = np.arange(12, dtype=np.int64) % 2
    ds = Dataset(x=np.zeros((12, 2), np.float32), y=y, num_classes=2, name="tiny")  # pool: 9 examples
    kw = dict(scheme="iid", seed=0, alpha=0.5, classes_per_node=2, central_test_fraction=0.2, local_test_fraction=0.15)

    sizes = [tuple(len(d) for d in node_data(ds, partition_id=i, num_partitions=4, min_size=2, **kw)) for i in range(4)]

    assert sizes == [(2, 1), (1, 1), (1, 1), (1, 1)], "3 then 2-example nodes keep a training and a test example"
    with pytest.raises(ValueError, match=r"node 0 holds 1 example\(s\).*set data.min_partition_size to at least 2"):
        node_data(ds, partition_id=0, num_partitions=9, min_size=1, **kw)
    with pytest.raises(ValueError, match=r"node 1 holds 2 example\(s\).*local_test_fraction=0.6.*at least 3"):
        node_data(ds, partition_id=1, num_partitions=4, min_size=2, **{**kw, "local_test_fraction": 0.6})

"""Datasets, the central test split and per-node partitions (numpy and scikit-learn only).

Every function here is deterministic for its ``seed``: the same arguments give
byte-identical arrays in a fresh process. No torch, Flower or Prefect import. The
dataset type lives in ``clients._dataset``, the loaders in ``clients._loaders`` (their
cache in ``clients._cache``, the text set ``rotten-tomatoes`` in ``clients._rotten_tomatoes``)
and the partition schemes in ``clients._partition``; this module is their public face.

How a node gets its data from the run's dataset (``node_data``):

1. ``split_central`` holds out a stratified central test set (the server's yardstick);
   the rest is the *pool*.
2. ``partition`` splits the pool's labels into ``num_partitions`` disjoint index sets.
3. The node's partition is split into local train and local test.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import metadata

import numpy as np

from clients._dataset import Dataset, DatasetKind, concatenate
from clients._cache import _cached, _KEYED
from clients._loaders import FASHION_MNIST_DIR, FILE_SUFFIXES, SHIPPED_DATASETS, Table, load_dataset, read_csv, read_npz
from clients._partition import PARTITION_SCHEMES, partition

__all__ = [
    "FASHION_MNIST_DIR", "FILE_SUFFIXES", "PARTITION_SCHEMES", "SHIPPED_DATASETS", "Dataset", "DatasetKind", "Table",
    "central_test", "concatenate", "load_dataset", "node_data", "partition", "pooled_train", "read_csv", "read_npz",
    "split_central", "split_local",
]


# ----------------------------------------------------------------------- splitting


def _derive_seed(seed: int, *salt: int) -> int:
    """Return an independent, reproducible 32-bit seed for one stage of the pipeline."""
    return int(np.random.SeedSequence([seed, *salt]).generate_state(1)[0])


_STAGE_CENTRAL, _STAGE_PARTITION, _STAGE_LOCAL = 1, 2, 3


def _split_indices(y: np.ndarray, *, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split positions 0..len(y)-1 into (train, test), stratified when every class allows it (cached: ``_cached``)."""
    positions = np.arange(len(y), dtype=np.int64)
    if test_fraction == 0.0:
        return positions, positions[:0]
    n_test = int(np.ceil(test_fraction * len(y)))
    if n_test >= len(y):
        raise ValueError(
            f"cannot split {len(y)} examples with test_fraction={test_fraction}: no training "
            f"example would remain; use a smaller fraction or more examples per node"
        )
    _, counts = np.unique(y, return_counts=True)
    stratifiable = counts.min() >= 2 and min(n_test, len(y) - n_test) >= len(counts)

    def split() -> dict[str, np.ndarray]:
        from sklearn.model_selection import train_test_split

        train, test = train_test_split(
            positions, test_size=n_test, random_state=seed, stratify=y if stratifiable else None
        )
        return {"train": np.sort(train), "test": np.sort(test)}

    # the split depends on the labels, the sizes, the seed and scikit-learn's algorithm: the cache key names all
    key = hashlib.sha256(np.ascontiguousarray(y, dtype=np.int64).tobytes())
    key.update(f"{n_test} {seed} {stratifiable} {_sklearn_version()}".encode())
    arrays = _cached(f"split-{key.hexdigest()[:32]}", _KEYED, split)
    return arrays["train"], arrays["test"]


@functools.cache
def _sklearn_version() -> str:
    """Return the installed scikit-learn version, read from its metadata once per process."""
    return metadata.version("scikit-learn")


def _check_fraction(name: str, value: float, *, allow_zero: bool) -> None:
    """Raise when a split fraction lies outside its valid interval."""
    low_ok = value >= 0.0 if allow_zero else value > 0.0
    if not (low_ok and value < 1.0):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"{name} must lie in {interval}, got {value}; typical values are 0.1 to 0.2")


def split_central(ds: Dataset, *, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split a dataset into (pool, central test), stratified by label and seeded."""
    _check_fraction("central_test_fraction", test_fraction, allow_zero=False)
    pool, test = _split_indices(ds.y, test_fraction=test_fraction, seed=_derive_seed(seed, _STAGE_CENTRAL))
    return ds.subset(pool), ds.subset(test)


def central_test(ds: Dataset, *, central_test_fraction: float, seed: int) -> Dataset:
    """Return the central test set that the server evaluates every arm on."""
    return split_central(ds, test_fraction=central_test_fraction, seed=seed)[1]


def split_local(ds: Dataset, *, local_test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split a node's own data into (local train, local test), stratified by label and seeded."""
    _check_fraction("local_test_fraction", local_test_fraction, allow_zero=True)
    train, test = _split_indices(ds.y, test_fraction=local_test_fraction, seed=_derive_seed(seed, _STAGE_LOCAL))
    return ds.subset(train), ds.subset(test)


# ------------------------------------------------------------------ per-node data


def _node_splits(
    ds: Dataset,
    *,
    num_partitions: int,
    scheme: str,
    seed: int,
    alpha: float,
    classes_per_node: int,
    central_test_fraction: float,
    local_test_fraction: float,
    min_size: int,
) -> list[tuple[Dataset, Dataset]]:
    """Return every node's (local train, local test), in partition order."""
    _check_fraction("local_test_fraction", local_test_fraction, allow_zero=True)
    pool, _ = split_central(ds, test_fraction=central_test_fraction, seed=seed)
    parts = partition(
        pool.y,
        num_partitions=num_partitions,
        scheme=scheme,
        seed=_derive_seed(seed, _STAGE_PARTITION),
        alpha=alpha,
        classes_per_node=classes_per_node,
        min_size=min_size,
        groups=pool.groups,
    )
    splits = []
    for partition_id, members in enumerate(parts):
        node = pool.subset(members)
        train, test = _split_indices(
            node.y, test_fraction=local_test_fraction, seed=_derive_seed(seed, _STAGE_LOCAL, partition_id)
        )
        splits.append((node.subset(train), node.subset(test)))
    return splits


def node_data(
    ds: Dataset,
    *,
    partition_id: int,
    num_partitions: int,
    scheme: str,
    seed: int,
    alpha: float,
    classes_per_node: int,
    central_test_fraction: float,
    local_test_fraction: float,
    min_size: int = 10,
) -> tuple[Dataset, Dataset]:
    """Return this node's (local train, local test) from its partition of the pool."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition_id must lie in 0..{num_partitions - 1} for num_partitions={num_partitions}, "
            f"got {partition_id}; check the node config"
        )
    return _node_splits(
        ds,
        num_partitions=num_partitions,
        scheme=scheme,
        seed=seed,
        alpha=alpha,
        classes_per_node=classes_per_node,
        central_test_fraction=central_test_fraction,
        local_test_fraction=local_test_fraction,
        min_size=min_size,
    )[partition_id]


def pooled_train(
    ds: Dataset,
    *,
    num_partitions: int,
    scheme: str,
    seed: int,
    alpha: float,
    classes_per_node: int,
    central_test_fraction: float,
    local_test_fraction: float,
    min_size: int = 10,
    partition_ids: tuple[int, ...] | None = None,
) -> Dataset:
    """Return the union of the nodes' local train sets, in partition order (centralized reference).

    ``partition_ids`` restricts the union to some nodes (e.g. one arm's nodes); None means all.
    """
    splits = _node_splits(
        ds,
        num_partitions=num_partitions,
        scheme=scheme,
        seed=seed,
        alpha=alpha,
        classes_per_node=classes_per_node,
        central_test_fraction=central_test_fraction,
        local_test_fraction=local_test_fraction,
        min_size=min_size,
    )
    chosen = range(num_partitions) if partition_ids is None else partition_ids
    for partition_id in chosen:
        if not 0 <= partition_id < num_partitions:
            raise ValueError(f"partition_ids must lie in 0..{num_partitions - 1}, got {partition_id}")
    return concatenate([splits[i][0] for i in chosen])

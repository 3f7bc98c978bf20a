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

A process remembers the last partitionings it made (``_plan``), as positions: in a
simulation one process answers for many virtual nodes, and each answer then costs only
its own node's split.
"""

from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
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


def _test_size(n: int, test_fraction: float) -> int:
    """Return how many of ``n`` examples a split with ``test_fraction`` holds out."""
    return int(np.ceil(test_fraction * n))


def _split_indices(
    y: np.ndarray, *, test_fraction: float, seed: int, on_disk: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Split positions 0..len(y)-1 into (train, test), stratified when every class allows it.

    ``on_disk``: keep the split in the disk cache (``_cached``), for the next process; False
    splits in this process only (the same split), e.g. for one of thousands of nodes.
    """
    positions = np.arange(len(y), dtype=np.int64)
    if test_fraction == 0.0:
        return positions, positions[:0]
    n_test = _test_size(len(y), test_fraction)
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

    if not on_disk:
        arrays = split()
        return arrays["train"], arrays["test"]
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


_DISK_SPLITS_UPTO = 64  # nodes whose local splits go to the disk cache, a file each; more split in-process
_PLANS_KEPT = 2  # partitionings a process remembers (a simulation's process answers many virtual nodes)


@dataclass
class _Plan:
    """Where one partitioning puts a dataset's examples, as positions (they depend on the labels and groups only)."""

    pool: np.ndarray  # the pool's positions in the dataset (the rest is the central test set)
    parts: list[np.ndarray]  # each node's positions in the pool
    local: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # node: (train, test) positions


_plans: OrderedDict[tuple, _Plan] = OrderedDict()


def _plan(
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
) -> _Plan:
    """Return the partitioning of ``ds``'s pool, made once per process for the same labels, groups and arguments.

    The key is the dataset's content, not the object: every message loads the dataset anew.
    """
    digest = hashlib.sha256(np.ascontiguousarray(ds.y, dtype=np.int64).tobytes())
    if ds.groups is not None:
        digest.update(np.ascontiguousarray(ds.groups.astype(str)).tobytes())
    key = (ds.name, len(ds), digest.hexdigest(), num_partitions, scheme, seed, alpha, classes_per_node,
           central_test_fraction, local_test_fraction, min_size)
    if key in _plans:
        _plans.move_to_end(key)
        return _plans[key]
    _check_fraction("central_test_fraction", central_test_fraction, allow_zero=False)
    pool, _ = _split_indices(ds.y, test_fraction=central_test_fraction, seed=_derive_seed(seed, _STAGE_CENTRAL))
    parts = partition(
        ds.y[pool],
        num_partitions=num_partitions,
        scheme=scheme,
        seed=_derive_seed(seed, _STAGE_PARTITION),
        alpha=alpha,
        classes_per_node=classes_per_node,
        min_size=min_size,
        groups=None if ds.groups is None else ds.groups[pool],
    )
    _plans[key] = _Plan(pool=pool, parts=parts)
    while len(_plans) > _PLANS_KEPT:
        _plans.popitem(last=False)
    return _plans[key]


def _local_split(
    ds: Dataset, plan: _Plan, *, partition_id: int, seed: int, local_test_fraction: float
) -> tuple[Dataset, Dataset]:
    """Return one node's (local train, local test), split once per process and kept in ``plan``."""
    if partition_id not in plan.local:
        members = plan.pool[plan.parts[partition_id]]
        if local_test_fraction and _test_size(len(members), local_test_fraction) >= len(members):
            enough = 2
            while _test_size(enough, local_test_fraction) >= enough:
                enough += 1
            raise ValueError(
                f"node {partition_id} holds {len(members)} example(s), too few to keep a training example after "
                f"local_test_fraction={local_test_fraction}; set data.min_partition_size to at least {enough} or lower "
                f"local_test_fraction"
            )
        train, test = _split_indices(
            ds.y[members], test_fraction=local_test_fraction, seed=_derive_seed(seed, _STAGE_LOCAL, partition_id),
            on_disk=len(plan.parts) <= _DISK_SPLITS_UPTO,
        )
        plan.local[partition_id] = (members[train], members[test])
    train, test = plan.local[partition_id]
    return ds.subset(train), ds.subset(test)


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
    partition_ids: range | tuple[int, ...] | None = None,
) -> list[tuple[Dataset, Dataset]]:
    """Return the nodes' (local train, local test), in the order of ``partition_ids`` (None: all nodes)."""
    _check_fraction("local_test_fraction", local_test_fraction, allow_zero=True)
    plan = _plan(ds, num_partitions=num_partitions, scheme=scheme, seed=seed, alpha=alpha,
                 classes_per_node=classes_per_node, central_test_fraction=central_test_fraction,
                 local_test_fraction=local_test_fraction, min_size=min_size)
    chosen = range(num_partitions) if partition_ids is None else partition_ids
    return [_local_split(ds, plan, partition_id=i, seed=seed, local_test_fraction=local_test_fraction)
            for i in chosen]


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
    (split,) = _node_splits(
        ds,
        num_partitions=num_partitions,
        scheme=scheme,
        seed=seed,
        alpha=alpha,
        classes_per_node=classes_per_node,
        central_test_fraction=central_test_fraction,
        local_test_fraction=local_test_fraction,
        min_size=min_size,
        partition_ids=(partition_id,),
    )
    return split


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
    chosen = range(num_partitions) if partition_ids is None else partition_ids
    for partition_id in chosen:
        if not 0 <= partition_id < num_partitions:
            raise ValueError(f"partition_ids must lie in 0..{num_partitions - 1}, got {partition_id}")
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
        partition_ids=chosen,
    )
    return concatenate([train for train, _ in splits])

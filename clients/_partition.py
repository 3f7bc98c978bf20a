"""Partitions: split a pool's positions over the nodes (iid, dirichlet, pathological, by a column's values). numpy only."""

from __future__ import annotations

import numpy as np

PARTITION_SCHEMES = ("iid", "dirichlet", "pathological", "by-column")
_MAX_DIRICHLET_DRAWS = 1000  # retries before a dirichlet partition gives up (not a tuning knob)


def partition(
    y: np.ndarray,
    *,
    num_partitions: int,
    scheme: str,
    seed: int,
    alpha: float = 0.5,
    classes_per_node: int = 2,
    min_size: int = 10,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Split positions of ``y`` into ``num_partitions`` disjoint, sorted index arrays.

    "iid" shuffles and splits evenly; "dirichlet" gives each partition a Dirichlet(alpha)
    share of every class; "pathological" gives each partition ``classes_per_node``
    classes; "by-column" keeps the rows of one ``groups`` value together (a natural
    partition: one node per value, or values grouped onto the nodes by size). iid,
    dirichlet and by-column cover every position; pathological leaves classes out only
    when ``num_partitions * classes_per_node`` is smaller than the number of classes.
    """
    y = np.asarray(y)
    if num_partitions < 1 or num_partitions * max(min_size, 1) > len(y):
        raise ValueError(
            f"cannot make {num_partitions} partitions of at least {max(min_size, 1)} examples "
            f"from {len(y)} examples; use fewer partitions or a smaller min_size"
        )
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(len(y)), num_partitions)
    elif scheme == "dirichlet":
        parts = _dirichlet(y, num_partitions=num_partitions, alpha=alpha, min_size=min_size, rng=rng)
    elif scheme == "pathological":
        parts = _pathological(y, num_partitions=num_partitions, classes_per_node=classes_per_node, rng=rng)
    elif scheme == "by-column":
        if groups is None:
            raise ValueError("partition scheme 'by-column' needs the rows' groups: set data.partition_by to a column")
        parts = _by_group(np.asarray(groups), num_partitions=num_partitions)
    else:
        raise ValueError(f"unknown partition scheme {scheme!r}; expected one of {', '.join(PARTITION_SCHEMES)}")
    smallest = min(len(p) for p in parts)
    if smallest < min_size:
        raise ValueError(
            f"{scheme} partition gave a node only {smallest} examples, expected at least "
            f"min_size={min_size}; raise classes_per_node, use fewer partitions or lower min_size"
        )
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _dirichlet(
    y: np.ndarray, *, num_partitions: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Give each partition a Dirichlet(alpha) share of every class; redraw until all >= min_size."""
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}; 0.1 is very skewed, 100 nearly iid")
    by_class = [np.flatnonzero(y == label) for label in np.unique(y)]
    smallest = 0
    for _ in range(_MAX_DIRICHLET_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for members in by_class:
            members = rng.permutation(members)
            shares = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for node, chunk in enumerate(np.split(members, cuts)):
                parts[node].append(chunk)
        merged = [np.concatenate(chunks) for chunks in parts]
        smallest = min(len(p) for p in merged)
        if smallest >= min_size:
            return merged
    raise ValueError(
        f"dirichlet(alpha={alpha}) partition: {_MAX_DIRICHLET_DRAWS} draws all left a node with "
        f"fewer than min_size={min_size} examples (last smallest: {smallest}); raise alpha, use "
        f"fewer partitions or lower min_size"
    )


def _by_group(groups: np.ndarray, *, num_partitions: int) -> list[np.ndarray]:
    """Put all rows of a group on one partition: the largest groups first, each onto the partition with fewest rows."""
    values, counts = np.unique(groups, return_counts=True)
    if len(values) < num_partitions:
        raise ValueError(f"the partition_by column has {len(values)} distinct value(s), fewer than the "
                         f"{num_partitions} nodes; start fewer nodes or partition by a column with more values")
    sizes = [0] * num_partitions
    members: list[list[int]] = [[] for _ in range(num_partitions)]
    for at in sorted(range(len(values)), key=lambda i: (-counts[i], values[i])):  # deterministic
        node = min(range(num_partitions), key=lambda n: (sizes[n], n))
        sizes[node] += int(counts[at])
        members[node].append(at)
    return [np.flatnonzero(np.isin(groups, values[m])) for m in members]


def _pathological(
    y: np.ndarray, *, num_partitions: int, classes_per_node: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Give each partition ``classes_per_node`` distinct classes; holders share a class evenly."""
    labels = np.unique(y)
    if not 1 <= classes_per_node <= len(labels):
        raise ValueError(
            f"classes_per_node must lie in 1..{len(labels)} (the classes present), got {classes_per_node}"
        )
    # Walk a shuffled class order cyclically: consecutive windows hold distinct classes,
    # and every class is used when num_partitions * classes_per_node >= number of classes.
    order = rng.permutation(labels)
    slots = [order[i % len(order)] for i in range(num_partitions * classes_per_node)]
    holders: dict[int, list[int]] = {}
    for slot, label in enumerate(slots):
        holders.setdefault(int(label), []).append(slot // classes_per_node)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
    for label in labels:
        nodes = holders.get(int(label), [])
        members = rng.permutation(np.flatnonzero(y == label))
        for node, chunk in zip(nodes, np.array_split(members, len(nodes)) if nodes else []):
            parts[node].append(chunk)
    return [np.concatenate(chunks) if chunks else np.empty(0, np.int64) for chunks in parts]

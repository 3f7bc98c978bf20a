"""Federated preprocessing of tables: node statistics, one spec for the federation, the same transform everywhere.

No data leaves a node, only counts and sums of its training split:

1. Every node computes :func:`local_stats` of its raw training table: per numeric column
   the count, sum, sum of squares, min, max and missing cells; per text (categorical)
   column the count of every category and the missing cells.
2. The server adds them up (:func:`merge_stats`) and builds one spec (:func:`build_spec`):
   numeric columns are standardized with the federated mean and standard deviation, and
   their missing cells take the federated mean; categorical columns are one-hot encoded
   over the union of the nodes' categories (rare ones, and all past ``max_categories``,
   share an "other" column), and their missing cells take the most frequent category.
3. :func:`apply_spec` turns any raw table (a node's splits, the central test set, the
   pooled reference data, a request to a served model) into the same float32 features.

A spec is plain JSON: it travels in the Flower run config, is stored in every checkpoint
and in the report, and can be written by hand (``check_spec`` validates one). numpy only.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from clients._dataset import as_cells, cell_number, is_text
from clients.data import Dataset

SPEC_VERSION = 1
DEFAULT_MAX_CATEGORIES = 32  # one-hot columns per categorical column, "other" included
DEFAULT_RARE_FRACTION = 0.01  # a category seen in fewer than this share of a column's values goes to "other"
OTHER = "(other)"  # name of the shared column of rare and unseen categories
_KINDS = ("numeric", "categorical")


class PreprocessingError(ValueError):
    """The nodes' tables do not agree, or a spec does not fit a table."""


# ------------------------------------------------------------------------- statistics


def column_kinds(ds: Dataset) -> list[str]:
    """Return "numeric" or "categorical" for each column of a raw table: categorical when a cell is not a number."""
    if ds.cells is None:
        return ["numeric"] * ds.x.shape[1]
    return ["categorical" if _has_text(ds.cells[:, j]) else "numeric" for j in range(ds.x.shape[1])]


def _has_text(column: np.ndarray) -> bool:
    """Return whether a column of raw cells holds a non-empty cell that is not a number."""
    return any(is_text(cell) for cell in np.unique(column))


def _what(ds: Dataset) -> str:
    """Return what a dataset that is not a table holds, in words: "images" or "text"."""
    return "images" if ds.kind == "image" else "text"


def local_stats(ds: Dataset) -> dict[str, Any]:
    """Return the statistics of one node's raw training table: counts and sums only, never a row."""
    if ds.kind != "tabular":
        raise PreprocessingError(f"dataset {ds.name!r} holds {_what(ds)}; preprocessing statistics are for tables")
    columns: dict[str, dict[str, Any]] = {}
    for j, (name, kind) in enumerate(zip(ds.feature_names, column_kinds(ds))):
        if kind == "numeric":
            values = ds.x[:, j].astype(np.float64)
            present = values[np.isfinite(values)]
            columns[name] = {
                "kind": "numeric", "count": int(present.size), "missing": int(values.size - present.size),
                "sum": float(present.sum()), "sum_sq": float(np.square(present).sum()),
                "min": float(present.min()) if present.size else None,
                "max": float(present.max()) if present.size else None,
            }
        else:
            cells = ds.cells[:, j]
            categories, counts = np.unique(cells[cells != ""], return_counts=True)
            columns[name] = {"kind": "categorical", "missing": int((cells == "").sum()),
                             "counts": {str(c): int(n) for c, n in zip(categories, counts)}}
    return {"version": SPEC_VERSION, "rows": len(ds), "order": list(ds.feature_names), "columns": columns}


def merge_stats(parts: Sequence[Mapping[str, Any]], *, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Add up the nodes' statistics; raise PreprocessingError when their columns or column kinds differ.

    ``names``: how errors name each part (e.g. "node 3"); default "node 1", "node 2", ...
    """
    if not parts:
        raise PreprocessingError("no node sent preprocessing statistics; start nodes that hold a table")
    names = list(names or [f"node {i + 1}" for i in range(len(parts))])
    order = list(parts[0]["order"])
    for name, part in zip(names[1:], parts[1:]):
        if list(part["order"]) != order:
            raise PreprocessingError(
                f"the nodes' tables have different columns: {names[0]} has {', '.join(order)}, {name} has "
                f"{', '.join(part['order'])}; give every node the same columns in the same order"
            )
    merged: dict[str, dict[str, Any]] = {}
    for column in order:
        columns = [part["columns"][column] for part in parts]
        if len({c["kind"] for c in columns}) > 1:  # a node without a single value agrees with the others' kind
            columns = [_as_categorical_if_empty(c) for c in columns]
        kinds = {name: c["kind"] for name, c in zip(names, columns)}
        if len(set(kinds.values())) > 1:
            text = ", ".join(n for n, k in kinds.items() if k == "categorical")
            numbers = ", ".join(n for n, k in kinds.items() if k == "numeric")
            raise PreprocessingError(
                f"column {column!r} holds text on {text} but only numbers on {numbers}; make the column "
                "categorical everywhere (e.g. prefix its values with a letter) or numeric everywhere"
            )
        merged[column] = _merge_column(columns)
    return {"version": SPEC_VERSION, "rows": sum(int(p["rows"]) for p in parts), "nodes": len(parts),
            "order": order, "columns": merged}


def _as_categorical_if_empty(column: Mapping[str, Any]) -> Mapping[str, Any]:
    """Return a numeric column without a single value as an empty categorical one (it agrees with either kind)."""
    if column["kind"] == "numeric" and int(column["count"]) == 0:
        return {"kind": "categorical", "missing": int(column["missing"]), "counts": {}}
    return column


def _merge_column(columns: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Add up one column's statistics over the nodes."""
    if columns[0]["kind"] == "categorical":
        counts: dict[str, int] = {}
        for column in columns:
            for category, n in column["counts"].items():
                counts[category] = counts.get(category, 0) + int(n)
        return {"kind": "categorical", "missing": sum(int(c["missing"]) for c in columns), "counts": counts}
    lows = [c["min"] for c in columns if c["min"] is not None]
    highs = [c["max"] for c in columns if c["max"] is not None]
    return {"kind": "numeric", "count": sum(int(c["count"]) for c in columns),
            "missing": sum(int(c["missing"]) for c in columns),
            "sum": math.fsum(float(c["sum"]) for c in columns), "sum_sq": math.fsum(float(c["sum_sq"]) for c in columns),
            "min": min(lows) if lows else None, "max": max(highs) if highs else None}


# ------------------------------------------------------------------------------- spec


def build_spec(stats: Mapping[str, Any], *, max_categories: int = DEFAULT_MAX_CATEGORIES,
               rare_fraction: float = DEFAULT_RARE_FRACTION) -> dict[str, Any]:
    """Turn the federation's statistics into a spec: standardize numbers, one-hot categories, fill missing cells."""
    if max_categories < 2:
        raise PreprocessingError(f"max_categories must be at least 2 (a category and 'other'), got {max_categories}")
    columns = []
    for name in stats["order"]:
        column = stats["columns"][name]
        if column["kind"] == "numeric":
            columns.append(_numeric_spec(name, column))
        else:
            columns.append(_categorical_spec(name, column, max_categories=max_categories, rare_fraction=rare_fraction))
    spec = {"version": SPEC_VERSION, "source": "federated", "rows": int(stats["rows"]),
            "nodes": int(stats.get("nodes", 1)), "columns": columns}
    check_spec(spec)
    return spec


def _numeric_spec(name: str, column: Mapping[str, Any]) -> dict[str, Any]:
    """Return the standardization of one numeric column from its federated count, sum and sum of squares."""
    count = int(column["count"])
    if count == 0:
        raise PreprocessingError(f"column {name!r} has no value on any node; drop the column or fill it")
    mean = float(column["sum"]) / count
    variance = max(float(column["sum_sq"]) / count - mean * mean, 0.0)
    std = math.sqrt(variance)
    # a constant column (or rounding noise around one) keeps its scale: dividing by ~0 would blow it up
    if std <= 1e-12 * max(1.0, abs(mean)):
        std = 1.0
    return {"name": name, "kind": "numeric", "mean": mean, "std": std, "fill": mean,
            "missing": int(column["missing"]), "min": column["min"], "max": column["max"]}


def _categorical_spec(name: str, column: Mapping[str, Any], *, max_categories: int,
                      rare_fraction: float) -> dict[str, Any]:
    """Return the one-hot encoding of one categorical column: its frequent categories, then "other"."""
    counts = column["counts"]
    if not counts:
        raise PreprocessingError(f"column {name!r} has no value on any node; drop the column or fill it")
    total = sum(counts.values())
    ranked = sorted(counts, key=lambda c: (-counts[c], c))  # most frequent first; ties by name (deterministic)
    frequent = [c for c in ranked if counts[c] >= rare_fraction * total]
    if len(frequent) == len(ranked) <= max_categories:
        kept = frequent  # every category has its own column
    else:
        kept = frequent[: max_categories - 1]  # the rest share "other", the max_categories-th column
    kept = sorted(kept)
    return {"name": name, "kind": "categorical", "categories": kept, "other": len(kept) < len(ranked),
            "fill": ranked[0], "missing": int(column["missing"]),
            "rare": len(ranked) - len(kept)}


def check_spec(spec: Mapping[str, Any]) -> None:
    """Raise PreprocessingError unless ``spec`` is a preprocessing spec this version can apply."""
    if not isinstance(spec, Mapping) or spec.get("version") != SPEC_VERSION:
        raise PreprocessingError(
            f"preprocessing spec: expected an object with version {SPEC_VERSION}, got "
            f"{spec.get('version') if isinstance(spec, Mapping) else type(spec).__name__!r}; copy the "
            "\"preprocessing\" object of a report.json or write one as README shows"
        )
    columns = spec.get("columns")
    if not isinstance(columns, list) or not columns:
        raise PreprocessingError("preprocessing spec: 'columns' must be a non-empty list of column objects")
    seen = set()
    for column in columns:
        name, kind = column.get("name"), column.get("kind")
        if not isinstance(name, str) or name in seen:
            raise PreprocessingError(f"preprocessing spec: column name {name!r} is missing or repeated")
        seen.add(name)
        if kind not in _KINDS:
            raise PreprocessingError(f"preprocessing spec: column {name!r} has kind {kind!r}; expected numeric or categorical")
        if kind == "numeric":
            for key in ("mean", "std", "fill"):
                value = column.get(key)
                if not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise PreprocessingError(f"preprocessing spec: column {name!r} needs a finite number {key!r}, got {value!r}")
            if column["std"] <= 0:
                raise PreprocessingError(f"preprocessing spec: column {name!r} needs std > 0, got {column['std']}")
        else:
            categories = column.get("categories")
            if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
                raise PreprocessingError(f"preprocessing spec: column {name!r} needs 'categories', a list of strings")
            if not categories and not column.get("other"):
                raise PreprocessingError(f"preprocessing spec: column {name!r} has no category and no 'other' column")
            if not isinstance(column.get("fill"), str):
                raise PreprocessingError(f"preprocessing spec: column {name!r} needs 'fill', the category of a missing cell")


def spec_digest(spec: Mapping[str, Any]) -> int:
    """Return a 48-bit digest of the spec (exact as a float metric): nodes report it, so a reader can check they agree."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return int(hashlib.sha256(canonical.encode()).hexdigest()[:12], 16)


def feature_names(spec: Mapping[str, Any]) -> list[str]:
    """Return the names of the features the spec produces, in order (``city=Paris`` for one-hot columns)."""
    names = []
    for column in spec["columns"]:
        if column["kind"] == "numeric":
            names.append(column["name"])
        else:
            names += [f"{column['name']}={c}" for c in column["categories"]]
            names += [f"{column['name']}={OTHER}"] if column.get("other") else []
    return names


def apply_spec(spec: Mapping[str, Any], ds: Dataset) -> Dataset:
    """Return the raw table ``ds`` as the spec's float32 features; raise PreprocessingError when its columns differ."""
    if ds.kind != "tabular":
        raise PreprocessingError(f"dataset {ds.name!r} holds {_what(ds)}; a preprocessing spec applies to tables only")
    wanted = [c["name"] for c in spec["columns"]]
    if list(ds.feature_names) != wanted:
        missing = [n for n in wanted if n not in ds.feature_names]
        extra = [n for n in ds.feature_names if n not in wanted]
        raise PreprocessingError(
            f"dataset {ds.name!r} does not have the spec's columns (missing: {', '.join(missing) or 'none'}; "
            f"not in the spec: {', '.join(extra) or 'none'}; the order differs if both are none); give the "
            "table the columns of the run's dataset"
        )
    blocks = []
    for j, column in enumerate(spec["columns"]):
        if column["kind"] == "numeric":
            values = ds.x[:, j].astype(np.float64)
            if ds.cells is not None and _has_text(ds.cells[:, j]):
                bad = next(c for c in ds.cells[:, j] if is_text(c))
                raise PreprocessingError(
                    f"dataset {ds.name!r}: column {column['name']!r} is numeric in the spec but holds {bad!r}; "
                    "fix the cell, or make the column categorical on every node"
                )
            values = np.where(np.isfinite(values), values, float(column["fill"]))
            blocks.append(((values - float(column["mean"])) / float(column["std"]))[:, None])
        else:
            blocks.append(_one_hot(_text_cells(ds, j), column))
    x = np.concatenate(blocks, axis=1).astype(np.float32)
    return Dataset(x=x, y=ds.y, num_classes=ds.num_classes, name=ds.name, columns=tuple(feature_names(spec)))


def _text_cells(ds: Dataset, j: int) -> np.ndarray:
    """Return column ``j`` as text cells ("" = missing), also for a table read without text cells."""
    return ds.cells[:, j] if ds.cells is not None else as_cells(ds.x[:, j:j + 1])[:, 0]


def _one_hot(cells: np.ndarray, column: Mapping[str, Any]) -> np.ndarray:
    """Return the one-hot block of one categorical column; missing cells take the fill, unseen ones "other"."""
    categories = list(column["categories"])
    width = len(categories) + (1 if column.get("other") else 0)
    index = {c: i for i, c in enumerate(categories)}
    fill = column["fill"]
    block = np.zeros((len(cells), width), dtype=np.float64)
    for row, cell in enumerate(cells):
        cell = cell or fill
        at = index.get(cell)
        if at is None and column.get("other"):
            at = width - 1
        if at is not None:  # an unseen category without an "other" column is all zeros
            block[row, at] = 1.0
    return block


def describe(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Return one row per column for the report: what the spec does to it."""
    rows = []
    for column in spec["columns"]:
        if column["kind"] == "numeric":
            what = f"standardized: mean {column['mean']:.4g}, std {column['std']:.4g}"
            fill = f"mean {column['fill']:.4g}"
        else:
            other = f" + {OTHER} ({column.get('rare', 0)} rare)" if column.get("other") else ""
            what = f"one-hot: {len(column['categories'])} categories{other}"
            fill = f"most frequent {column['fill']!r}"
        rows.append({"column": column["name"], "kind": column["kind"], "transform": what,
                     "missing cells": int(column.get("missing", 0)), "missing →": fill})
    return rows


def prepare(ds: Dataset, spec: Mapping[str, Any] | None) -> Dataset:
    """Return the dataset as the model sees it: the spec applied to a table, or as loaded when there is no spec.

    Raises PreprocessingError for a table with text or empty cells and no spec, or a spec on images.
    """
    if spec is not None:
        return apply_spec(spec, ds)
    if ds.raw:
        kind = "text" if ds.cells is not None else "empty"
        raise PreprocessingError(
            f"dataset {ds.name!r} has {kind} cells and the run has no preprocessing spec to turn them into "
            "numbers; run it through the flow (data.preprocessing 'federated' builds one from the nodes' "
            "statistics) or pass a spec's JSON as run config 'preprocessing'"
        )
    return ds


def encode_rows(spec: Mapping[str, Any], rows: Sequence[Any]) -> np.ndarray:
    """Return raw rows (objects of column -> number, text or null) as the spec's float32 features.

    Raises PreprocessingError naming the row and column of the first value that does not fit.
    """
    names = [c["name"] for c in spec["columns"]]
    cells = np.full((len(rows), len(names)), "", dtype=object)
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise PreprocessingError(f"row {i} is {type(row).__name__}, expected an object of column -> value")
        unknown = sorted(set(row) - set(names))
        if unknown:
            raise PreprocessingError(f"row {i} has column(s) {', '.join(map(str, unknown))} that the model does not "
                                     f"take; its columns: {', '.join(names)}")
        for j, name in enumerate(names):
            value = row.get(name)
            if value is None:
                continue  # missing: filled as in training
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise PreprocessingError(f"row {i} column {name!r} is {type(value).__name__}, expected a number, "
                                         "text or null")
            if isinstance(value, float) and not math.isfinite(value):
                raise PreprocessingError(f"row {i} column {name!r} is {value}, expected a finite number or null")
            cells[i, j] = str(value).strip()
    text = cells.astype(str)
    numbers = np.array([[cell_number(c) for c in line] for line in text], dtype=np.float32).reshape(text.shape)
    table = Dataset(x=numbers, y=np.zeros(len(rows), dtype=np.int64), num_classes=1, name="request",
                    columns=tuple(names), cells=text)
    return apply_spec(spec, table).x


"""The dataset type every part of fedcompare passes around: features, labels and, for tables, their raw cells.

Text datasets hold hashed word ids (``clients.text.token_ids``) instead of float features."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

DatasetKind = Literal["image", "tabular", "text"]


@dataclass(frozen=True)
class Dataset:
    """Features and integer labels of one dataset (or a subset of it)."""

    # float32 images (N, C, H, W) or tabular (N, F), NaN: a missing or non-numeric cell of a raw table;
    # int64 text (N, L): hashed word ids, left-aligned, 0 = padding (clients.text.token_ids)
    x: np.ndarray
    y: np.ndarray  # int64 labels in 0..num_classes-1
    num_classes: int  # classes of the whole dataset, also when a subset lacks some
    name: str  # where it came from: "mnist", "digits", a file name
    columns: tuple[str, ...] = ()  # names of a table's columns (a CSV header); () = x0, x1, ...
    cells: np.ndarray | None = None  # a raw table's cells as text (N, F), "" = empty; only when one is not a number
    groups: np.ndarray | None = None  # (N,) text: the value of the partition_by column (not a feature), or None

    def __post_init__(self) -> None:
        """Reject arrays that do not fit the dataset contract."""
        text = self.x.dtype == np.int64
        if not (self.x.dtype == np.float32 or text) or self.y.dtype != np.int64:
            raise ValueError(
                f"dataset {self.name!r}: expected x float32 and y int64 (x int64: a text's hashed token ids), got x "
                f"{self.x.dtype} and y {self.y.dtype}; build datasets with load_dataset or cast the arrays"
            )
        if text and (self.x.ndim != 2 or self.columns or self.cells is not None or (self.x.size and self.x.min() < 0)):
            raise ValueError(f"dataset {self.name!r}: int64 features are hashed token ids (N, L) >= 0 without columns "
                             f"or cells, got shape {self.x.shape}; build them with clients.text.token_ids")
        if self.x.ndim not in (2, 4) or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise ValueError(
                f"dataset {self.name!r}: expected x of shape (N, F) or (N, C, H, W) and y of "
                f"shape (N,), got x {self.x.shape} and y {self.y.shape}"
            )
        if self.columns and (self.x.ndim != 2 or len(self.columns) != self.x.shape[1]):
            raise ValueError(f"dataset {self.name!r}: {len(self.columns)} column names for features {self.x.shape[1:]}")
        if self.groups is not None and self.groups.shape != self.y.shape:
            raise ValueError(f"dataset {self.name!r}: groups {self.groups.shape} do not match labels {self.y.shape}")
        if self.cells is not None and self.cells.shape != self.x.shape:
            raise ValueError(f"dataset {self.name!r}: text cells {self.cells.shape} do not match features {self.x.shape}")
        if len(self.y) and (self.y.min() < 0 or self.y.max() >= self.num_classes):
            raise ValueError(
                f"dataset {self.name!r}: labels must lie in 0..{self.num_classes - 1}, got "
                f"{self.y.min()}..{self.y.max()}; remap labels before building the dataset"
            )

    def __len__(self) -> int:
        """Return the number of examples."""
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Return the shape of one example."""
        return tuple(int(d) for d in self.x.shape[1:])

    @property
    def kind(self) -> DatasetKind:
        """Return "image" for (N, C, H, W) features, "text" for int64 token ids (N, L) and "tabular" for (N, F)."""
        if self.x.dtype == np.int64:
            return "text"
        return "image" if self.x.ndim == 4 else "tabular"

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Return a table's column names (x0, x1, ... when the source has none)."""
        if self.kind != "tabular":
            return ()
        return self.columns or tuple(f"x{i}" for i in range(self.x.shape[1]))

    @property
    def raw(self) -> bool:
        """Return whether this is a table with text or missing cells, which needs a preprocessing spec to train on."""
        return self.cells is not None or (self.kind != "text" and bool(np.isnan(self.x).any()))

    def subset(self, idx: np.ndarray) -> Dataset:
        """Return the examples at ``idx`` (in that order) as a new dataset."""
        idx = np.asarray(idx, dtype=np.int64)
        return Dataset(
            x=np.ascontiguousarray(self.x[idx]),
            y=np.ascontiguousarray(self.y[idx]),
            num_classes=self.num_classes,
            name=self.name,
            columns=self.columns,
            cells=None if self.cells is None else np.ascontiguousarray(self.cells[idx]),
            groups=None if self.groups is None else np.ascontiguousarray(self.groups[idx]),
        )


def concatenate(parts: list[Dataset]) -> Dataset:
    """Return the examples of ``parts`` one after another, as one dataset (the first part's name and classes)."""
    first = parts[0]
    cells = None
    if any(p.cells is not None for p in parts):
        cells = np.concatenate([p.cells if p.cells is not None else as_cells(p.x) for p in parts])
    groups = np.concatenate([p.groups for p in parts]) if all(p.groups is not None for p in parts) else None
    return Dataset(x=np.concatenate([p.x for p in parts]), y=np.concatenate([p.y for p in parts]),
                   num_classes=first.num_classes, name=first.name, columns=first.columns, cells=cells, groups=groups)


def as_cells(x: np.ndarray) -> np.ndarray:
    """Return numeric features (N, F) as text cells ("" for NaN), e.g. to join a table that has text cells."""
    return np.array([["" if not np.isfinite(v) else format(float(v), "g") for v in row] for row in x], dtype=str)


def cell_number(cell: str) -> float:
    """Return a raw table cell as a number; NaN for an empty cell or text."""
    try:
        return float(cell) if cell else math.nan
    except ValueError:
        return math.nan


def is_text(cell: str) -> bool:
    """Return whether a raw table cell holds text: not empty and not a number."""
    if not cell:
        return False
    try:
        float(cell)
    except ValueError:
        return True
    return False

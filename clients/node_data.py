"""A node's own data file: load, validate and summarize it (numpy, scikit-learn and Pillow only).

A real node holds its private data instead of a partition of the run's dataset. Three
formats, picked with ``data_format`` ("auto" picks by suffix, or "image-folder" for a
directory):

* ``csv``: a header row; ``label_column`` holds the labels, every other column is a
  feature: numbers, text (categories) or empty cells (missing), which the run's
  preprocessing spec (`clients/preprocess.py`) turns into numbers.
* ``npz``: arrays ``x`` ((N, F), (N, H, W) or (N, C, H, W)) and ``y`` ((N,)).
* ``image-folder``: one subfolder per class holding image files (`clients/images.py`: integer
  folder names are the labels; colour is kept, every image is resized to the run's size).

Labels are never remapped: a node holding only classes 3 and 7 keeps 3 and 7, so that
every node and the server agree on what a label means. Labels must be non-negative
integers. Every problem raises ``NodeDataError`` with one line naming the file, the
problem and the fix. No torch, Flower, Prefect or minio import.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clients.data import Dataset, Table, read_csv, read_npz
from clients.images import read_image_folder

DATA_FORMATS = ("auto", "csv", "npz", "image-folder")
MIN_EXAMPLES = 2  # one to train on and one to test on


class NodeDataError(ValueError):
    """A node's own data file is missing, unreadable or does not fit the run."""


@dataclass(frozen=True)
class NodeDataSummary:
    """What a node's data file holds: counts and shapes only, never data."""

    path: str  # the file or folder, as given
    data_format: str  # csv | npz | image-folder (never "auto")
    num_examples: int
    feature_shape: tuple[int, ...]  # shape of one example, e.g. (64,) or (1, 28, 28)
    class_counts: dict[int, int]  # label -> number of examples, labels as in the file


def resolve_format(path: str | Path, data_format: str = "auto") -> str:
    """Return the concrete format of ``path``: the one given, or the one its suffix or kind implies."""
    path = Path(path)
    if data_format not in DATA_FORMATS:
        raise NodeDataError(
            f"node data {str(path)!r}: data format {data_format!r} is unknown; expected one of "
            f"{', '.join(DATA_FORMATS)}"
        )
    if not path.exists():
        raise NodeDataError(
            f"node data {str(path)!r} does not exist (resolved to {str(path.resolve())!r}); "
            "check the node config's data-path"
        )
    if data_format != "auto":
        return data_format
    if path.is_dir():
        return "image-folder"
    suffix = path.suffix.lower()
    if suffix in (".csv", ".npz"):
        return suffix[1:]
    raise NodeDataError(
        f"node data {str(path)!r}: cannot tell the format from the suffix {suffix or '(none)'!r}; "
        "name the file .csv or .npz, or set data-format to csv, npz or image-folder"
    )


def load_node_data(path: str | Path, *, data_format: str = "auto", label_column: str = "label",
                   image_size: tuple[int, int] | None = None, channels: int | None = None) -> Dataset:
    """Load a node's own data file with its labels as they are (num_classes: largest label + 1).

    ``image_size`` (H, W) and ``channels`` bring an image folder to the run's input shape
    (None: the first image's size; grayscale if every image is).
    """
    path = Path(path)
    fmt = resolve_format(path, data_format)
    columns, cells = (), None
    if fmt == "image-folder":
        x, labels = _read_image_folder(path, size=image_size, channels=channels)
    else:
        table = _read_file(path, fmt, label_column=label_column)
        x, labels, columns, cells = table.features, table.labels, table.columns, table.cells
    y = _labels(labels, path, fmt=fmt, label_column=label_column)
    if len(y) < MIN_EXAMPLES:
        raise NodeDataError(
            f"node data {str(path)!r} has {len(y)} example(s), expected at least {MIN_EXAMPLES} "
            "(one to train on, one to test on); add examples"
        )
    return Dataset(x=np.ascontiguousarray(x, dtype=np.float32), y=y, num_classes=int(y.max()) + 1, name=path.name,
                   columns=columns, cells=cells)


def summarize(dataset: Dataset, *, path: str | Path, data_format: str = "auto") -> NodeDataSummary:
    """Return the counts and shapes of a loaded node dataset."""
    labels, counts = np.unique(dataset.y, return_counts=True)
    return NodeDataSummary(
        path=str(path),
        data_format=resolve_format(path, data_format),
        num_examples=len(dataset),
        feature_shape=dataset.input_shape,
        class_counts={int(k): int(v) for k, v in zip(labels, counts)},
    )


def inspect_node_data(path: str | Path, *, data_format: str = "auto", label_column: str = "label") -> NodeDataSummary:
    """Load and validate a node's data file; return its counts and shapes."""
    dataset = load_node_data(path, data_format=data_format, label_column=label_column)
    return summarize(dataset, path=path, data_format=data_format)


def check_compatible(summary: NodeDataSummary, *, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Raise NodeDataError when the node's data does not fit the run's model input shape or classes."""
    expected = tuple(int(d) for d in input_shape)
    if summary.feature_shape != expected:
        raise NodeDataError(
            f"node data {summary.path!r}: feature shape does not match the run's model input: expected "
            f"{expected}, got {summary.feature_shape}; give the node data in the run dataset's shape"
        )
    outside = sorted(label for label in summary.class_counts if not 0 <= label < num_classes)
    if outside:
        raise NodeDataError(
            f"node data {summary.path!r}: labels must lie in 0..{num_classes - 1} (the run's {num_classes} "
            f"classes), got {', '.join(map(str, outside))}; number the classes as the run's dataset does"
        )


# --------------------------------------------------------------------------- readers


def _read_file(path: Path, fmt: str, *, label_column: str) -> Table:
    """Read a CSV or NPZ file with clients.data's readers, turning every failure into one NodeDataError line."""
    if not path.is_file():
        raise NodeDataError(
            f"node data {str(path)!r} is not a file, expected a .{fmt} file; point data-path at the file, "
            "or set data-format to image-folder for a folder of class subfolders"
        )
    if path.stat().st_size == 0:
        raise NodeDataError(f"node data {str(path)!r} is empty (0 bytes); write the node's examples into it")
    try:
        if fmt == "csv":
            return read_csv(path, label_column=label_column)
        features, labels = read_npz(path)
        return Table(features, labels, (), None)
    except UnicodeDecodeError as err:
        raise NodeDataError(
            f"node data {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start}); save the CSV as UTF-8"
        ) from None
    except ValueError as err:
        message = " ".join(str(err).split())
        if str(path) not in message:  # numpy's own errors do not name the file
            message = f"node data {str(path)!r} cannot be read as {fmt}: {message}; write it with np.savez or as CSV"
        raise NodeDataError(message) from None
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise NodeDataError(
            f"node data {str(path)!r} cannot be read as {fmt} ({type(err).__name__}: {' '.join(str(err).split())}); "
            f"check its permissions and that it is a complete .{fmt} file"
        ) from None


def _read_image_folder(path: Path, *, size: tuple[int, int] | None, channels: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Read a folder of class subfolders (clients.images), turning every failure into one NodeDataError line."""
    try:
        return read_image_folder(path, size=size, channels=channels, who="node data")
    except ValueError as err:
        raise NodeDataError(str(err)) from None


def _labels(raw: np.ndarray, path: Path, *, fmt: str, label_column: str) -> np.ndarray:
    """Return labels as int64 without remapping; raise NodeDataError on a non-integer or negative label."""
    raw = np.asarray(raw)
    if raw.size == 0:
        raise NodeDataError(f"node data {str(path)!r} has no examples; write the node's examples into it")
    if raw.dtype.kind in "biu":
        values = raw.astype(np.int64)
        bad = np.flatnonzero(values < 0)
    else:
        numbers = np.full(raw.shape, np.nan)
        for i, value in enumerate(raw.tolist()):
            try:
                numbers[i] = float(value)
            except (TypeError, ValueError):
                pass
        bad = np.flatnonzero(~np.isfinite(numbers) | (numbers < 0) | (numbers != np.round(numbers)))
        values = np.where(np.isfinite(numbers), numbers, -1).astype(np.int64)
    if len(bad):
        row = int(bad[0])
        where = f"column {label_column!r} line {row + 2}" if fmt == "csv" else f"array 'y' example {row}"
        raise NodeDataError(
            f"node data {str(path)!r}: the label in {where} is {raw[bad[0]].item()!r}, expected a "
            "non-negative integer class label; number the classes 0, 1, ... the same way on every node"
        )
    return values

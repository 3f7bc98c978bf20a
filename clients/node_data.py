"""A node's own data file: load, validate and summarize it (numpy, scikit-learn and Pillow only).

A real node holds its private data instead of a partition of the run's dataset. Three
formats, picked with ``data_format`` ("auto" picks by suffix, or "image-folder" for a
directory):

* ``csv``: a header row; ``label_column`` holds the labels, every other column is a
  numeric feature.
* ``npz``: arrays ``x`` ((N, F), (N, H, W) or (N, C, H, W)) and ``y`` ((N,)).
* ``image-folder``: one subfolder per class holding image files (.png, .jpg, .jpeg,
  .bmp, .gif, .tif, .tiff, .webp; other and hidden files are ignored). When every
  subfolder name is a non-negative integer ("0", "3", "7") it *is* the label; otherwise
  the sorted subfolder names map to 0..n-1, which agrees across nodes only when every
  node holds the same set of class folders, so prefer integer names in a federation.
  Images become grayscale float32 in [0, 1], shape (1, H, W); all must share one size.

Labels are never remapped: a node holding only classes 3 and 7 keeps 3 and 7, so that
every node and the server agree on what a label means. Labels must be non-negative
integers. Every problem raises ``NodeDataError`` with one line naming the file, the
problem and the fix. No torch, Flower, Prefect or minio import.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clients.data import Dataset, read_csv, read_npz

DATA_FORMATS = ("auto", "csv", "npz", "image-folder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MIN_EXAMPLES = 2  # one to train on and one to test on
_PIXEL_MAX = 255.0  # 8-bit grayscale


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


def load_node_data(path: str | Path, *, data_format: str = "auto", label_column: str = "label") -> Dataset:
    """Load a node's own data file with its labels as they are (num_classes: largest label + 1)."""
    path = Path(path)
    fmt = resolve_format(path, data_format)
    if fmt == "image-folder":
        x, labels = _read_image_folder(path)
    else:
        x, labels = _read_file(path, fmt, label_column=label_column)
    y = _labels(labels, path, fmt=fmt, label_column=label_column)
    if len(y) < MIN_EXAMPLES:
        raise NodeDataError(
            f"node data {str(path)!r} has {len(y)} example(s), expected at least {MIN_EXAMPLES} "
            "(one to train on, one to test on); add examples"
        )
    return Dataset(x=np.ascontiguousarray(x, dtype=np.float32), y=y, num_classes=int(y.max()) + 1, name=path.name)


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


def _read_file(path: Path, fmt: str, *, label_column: str) -> tuple[np.ndarray, np.ndarray]:
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
        return read_npz(path)
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


def _read_image_folder(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a folder of class subfolders into (grayscale images (N, 1, H, W) in [0, 1], labels (N,))."""
    if not path.is_dir():
        raise NodeDataError(
            f"node data {str(path)!r} is not a folder, expected one subfolder of images per class; "
            "set data-format to csv or npz for a file"
        )
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise NodeDataError(
            f"node data {str(path)!r} has no class subfolders; put each class's images in a subfolder "
            "named by its integer label (0, 1, ...)"
        )
    numbered = all(re.fullmatch(r"\d+", name) for name in classes)
    label_of = {name: int(name) if numbered else i for i, name in enumerate(classes)}
    images, labels, first = [], [], None
    for name in classes:
        for file in sorted((path / name).iterdir()):
            if file.name.startswith(".") or file.suffix.lower() not in IMAGE_SUFFIXES or not file.is_file():
                continue
            pixels = _read_image(file)
            if first is None:
                first = (file, pixels.shape)
            elif pixels.shape != first[1]:
                raise NodeDataError(
                    f"node data {str(path)!r}: image {str(file)!r} is {_size(pixels.shape)}, expected "
                    f"{_size(first[1])} like {first[0].name!r}; resize all images to one size"
                )
            images.append(pixels)
            labels.append(label_of[name])
    if not images:
        raise NodeDataError(
            f"node data {str(path)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}) in its class subfolders; "
            "add images"
        )
    return np.stack(images)[:, None, :, :], np.asarray(labels, dtype=np.int64)


def _read_image(file: Path) -> np.ndarray:
    """Read one image as a grayscale float32 (H, W) array in [0, 1]."""
    try:
        from PIL import Image
    except ImportError:
        raise NodeDataError(
            f"node data image {str(file)!r}: reading image folders needs Pillow, which is not installed; "
            "pip install pillow, or convert the images to an .npz file"
        ) from None
    try:
        with Image.open(file) as image:
            grey = image.convert("L")
    except (OSError, ValueError) as err:
        raise NodeDataError(
            f"node data image {str(file)!r} cannot be read ({' '.join(str(err).split())}); "
            "replace or remove that file"
        ) from None
    return np.asarray(grey, dtype=np.float32) / np.float32(_PIXEL_MAX)


def _size(shape: tuple[int, ...]) -> str:
    """Return an image shape (H, W) as "WxH" pixels."""
    return f"{shape[1]}x{shape[0]} pixels"


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

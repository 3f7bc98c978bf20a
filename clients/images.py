"""Folders of images, one subfolder per class: read, keep their colour, bring them to one size (numpy and Pillow).

When every subfolder name is a non-negative integer ("0", "3", "7") it *is* the label;
otherwise the sorted subfolder names map to 0..n-1, which agrees across nodes only when
every node holds the same set of class folders, so prefer integer names in a federation.
Images become float32 in [0, 1] of shape (C, H, W): C = 1 when every image is grayscale,
3 (RGB) otherwise (or as ``channels`` says); every image is resized to ``size`` (H, W),
by default the first image's size. Other and hidden files are ignored.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MIN_SIDE = 4  # pixels: the smallest image the models take (two 2x2 poolings)
_PIXEL_MAX = 255.0  # 8-bit channels
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def read_image_folder(path: Path, *, size: tuple[int, int] | None = None, channels: int | None = None,
                      who: str = "dataset") -> tuple[np.ndarray, np.ndarray]:
    """Read a folder of class subfolders into (images (N, C, H, W) in [0, 1], int64 labels (N,)); raise ValueError.

    ``size``: (H, W) every image is resized to (None: the first image's); ``channels``: 1 or 3
    (None: 1 if every image is grayscale, else 3); ``who`` starts every error message.
    """
    if size is not None and min(size) < MIN_SIDE:
        raise ValueError(f"{who} {str(path)!r}: image size {size[1]}x{size[0]} is too small; use at least "
                         f"{MIN_SIDE}x{MIN_SIDE} pixels (data.image_size)")
    if not path.is_dir():
        raise ValueError(f"{who} {str(path)!r} is not a folder, expected one subfolder of images per class; "
                         "set data-format to csv or npz for a file")
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{who} {str(path)!r} has no class subfolders; put each class's images in a subfolder "
                         "named by its integer label (0, 1, ...)")
    numbered = all(re.fullmatch(r"\d+", name) for name in classes)
    label_of = {name: int(name) if numbered else i for i, name in enumerate(classes)}
    files = [(file, label_of[name]) for name in classes for file in sorted((path / name).iterdir())
             if not file.name.startswith(".") and file.suffix.lower() in IMAGE_SUFFIXES and file.is_file()]
    if not files:
        raise ValueError(f"{who} {str(path)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}) in its class "
                         "subfolders; add images")
    opened = [_open(file, who) for file, _ in files]
    if channels is None:
        channels = 1 if all(image.mode in _GRAY_MODES for image in opened) else 3
    if size is None:
        size = (opened[0].height, opened[0].width)
        if min(size) < MIN_SIDE:
            raise ValueError(f"{who} {str(path)!r}: the first image {files[0][0].name!r} is {size[1]}x{size[0]} "
                             f"pixels, below {MIN_SIDE}x{MIN_SIDE}; set data.image_size to a larger size")
    pixels = np.stack([_pixels(image, size=size, channels=channels) for image in opened])
    return pixels, np.asarray([label for _, label in files], dtype=np.int64)


def _open(file: Path, who: str):
    """Open one image fully (its pixels read, the file closed); raise ValueError naming it."""
    try:
        from PIL import Image
    except ImportError:
        raise ValueError(f"{who} image {str(file)!r}: reading image folders needs Pillow, which is not installed; "
                         "pip install pillow, or convert the images to an .npz file") from None
    try:
        with Image.open(file) as image:
            image.load()
            return image.copy()
    except (OSError, ValueError) as err:
        raise ValueError(f"{who} image {str(file)!r} cannot be read ({' '.join(str(err).split())}); "
                         "replace or remove that file") from None


def _pixels(image, *, size: tuple[int, int], channels: int) -> np.ndarray:
    """Return one image as float32 (C, H, W) in [0, 1]: converted to gray or RGB, resized to ``size`` (H, W)."""
    from PIL import Image

    converted = image.convert("L" if channels == 1 else "RGB")
    if (converted.height, converted.width) != size:
        converted = converted.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    array = np.asarray(converted, dtype=np.float32) / np.float32(_PIXEL_MAX)
    return array[None, :, :] if channels == 1 else np.ascontiguousarray(array.transpose(2, 0, 1))

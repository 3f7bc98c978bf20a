"""Tests of the .npz encoding of a checkpoint's model: deterministic bytes, and the streaming decoder that reads
a download as it arrives, in any chunking, and refuses what it cannot decode.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from infra._npz import NpzStreamReader
from infra.checkpoints import arrays_to_npz_bytes, npz_bytes_to_arrays
from tests.store_helpers import assert_same_arrays, model_arrays


def test_npz_bytes_round_trip_and_are_deterministic() -> None:
    arrays = model_arrays(0)
    data = arrays_to_npz_bytes(arrays)
    assert_same_arrays(npz_bytes_to_arrays(data), arrays)
    assert arrays_to_npz_bytes(model_arrays(0)) == data
    with pytest.raises(ValueError):
        arrays_to_npz_bytes({"obj": np.array([object()], dtype=object)})


def _odd_arrays() -> dict[str, np.ndarray]:
    """Return arrays that stress the decoder: 0-d, empty, Fortran order, structured, bool, big-endian."""
    return {
        "scalar": np.array(3.5),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "fortran": np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4)),
        "record": np.array([(1, 2.0), (3, 4.0)], dtype=[("a", "<i4"), ("b", "<f8")]),
        "mask": np.array([True, False, True]),
        "big_endian": np.arange(5, dtype=">u4"),
    }


def _np_savez_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Return what np.savez writes (seekable zip, sizes in the local headers, no data descriptors)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 30])
@pytest.mark.parametrize("writer", ["write_npz", "np.savez"])
def test_stream_reader_decodes_npz_in_any_chunking(chunk: int, writer: str) -> None:
    arrays = _odd_arrays()
    data = arrays_to_npz_bytes(arrays) if writer == "write_npz" else _np_savez_bytes(arrays)
    reader = NpzStreamReader(limit=len(data))
    for start in range(0, len(data), chunk):
        reader.write(data[start:start + chunk])
    got = reader.arrays()
    assert_same_arrays(got, arrays)
    assert got["fortran"].flags.f_contiguous and got["big_endian"].dtype == np.dtype(">u4")


def test_stream_reader_rejects_what_it_cannot_decode() -> None:
    arrays = _odd_arrays()
    data = arrays_to_npz_bytes(arrays)
    truncated = NpzStreamReader(limit=len(data))
    truncated.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="ended inside a member"):
        truncated.arrays()
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    compressed = NpzStreamReader(limit=len(buf.getvalue()))
    compressed.write(buf.getvalue())
    with pytest.raises(ValueError, match="compression method 8"):
        compressed.arrays()
    greedy = NpzStreamReader(limit=100)  # a damaged header must not allocate more than the object holds
    greedy.write(arrays_to_npz_bytes({"big": np.zeros(1000)}))
    with pytest.raises(ValueError, match="more than the 100 expected"):
        greedy.arrays()

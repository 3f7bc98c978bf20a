"""Model arrays to and from .npz archives, streamed through their digests (private; use infra.checkpoints).

An archive is written front to back and never rewritten (zip data descriptors instead of
patched headers), so it can be hashed while it is written and the bytes are the same
whether they go to memory or to a file.
"""

from __future__ import annotations

import ast
import hashlib
import io
import queue
import struct
import tempfile
import threading
import zipfile
from typing import IO, Any, BinaryIO, Mapping

import numpy as np
import xxhash

__all__ = ["DIGESTS", "BackgroundWriter", "HashingWriter", "NpzStreamReader", "arrays_to_npz_bytes",
           "describe_arrays", "entry_of", "npz_bytes_to_arrays", "read_digest", "read_npz", "spool", "write_npz"]

SPOOL_MAX = 16 << 20  # a serialized model up to this size stays in memory; a larger one spills to a temp file


DIGESTS = ("sha256", "xxh3_128")  # what a manifest entry records
_READ_ORDER = ("xxh3_128", "sha256")  # a read verifies the first of these its entry has


def _hasher(name: str) -> Any:
    """Return a fresh hash object for one of DIGESTS."""
    return xxhash.xxh3_128() if name == "xxh3_128" else hashlib.new(name)


class HashingWriter:
    """A write-only file that passes bytes on to ``target`` while counting and hashing them.

    ``digests`` names the hashes to compute (of DIGESTS): writing records sha256 (the
    object's identity) and xxh3-128; a verified read computes only the one it checks.
    """

    def __init__(self, target: IO[bytes], digests: tuple[str, ...] = DIGESTS) -> None:
        self._target = target
        self._hashes = {name: _hasher(name) for name in digests}
        self.size = 0

    def write(self, data: Any) -> int:
        """Hash ``data``, write it to the target and return its length."""
        view = memoryview(data)
        for hasher in self._hashes.values():
            hasher.update(view)
        self._target.write(view)
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        """Flush the target."""
        self._target.flush()

    def hexdigests(self) -> dict[str, str]:
        """Return the hex digest of everything written so far, per hash name."""
        return {name: hasher.hexdigest() for name, hasher in self._hashes.items()}


def entry_of(data: bytes) -> dict[str, Any]:
    """Return the manifest entry of ``data``: its digests (DIGESTS) and size."""
    return {**{name: _digest(name, data) for name in DIGESTS}, "size": len(data)}


def _digest(name: str, data: bytes) -> str:
    """Return the hex digest of ``data`` under hash ``name``."""
    hasher = _hasher(name)
    hasher.update(data)
    return hasher.hexdigest()


def read_digest(entry: Mapping[str, Any]) -> str:
    """Return the digest a read verifies for a manifest entry: xxh3-128 where recorded, else sha256."""
    return next(name for name in _READ_ORDER if name in entry)


class BackgroundWriter:
    """A write-only file that hands each chunk to a worker thread writing it to ``target``.

    Hashing and decoding a download then overlap with receiving it (hashlib and numpy copies
    release the GIL). At most ``depth`` chunks wait in between. Use as a context manager;
    leaving it waits for the worker and re-raises what the worker raised.
    """

    def __init__(self, target: Any, *, depth: int = 8) -> None:
        self._target = target
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="fedcompare-checkpoint-writer")

    def __enter__(self) -> BackgroundWriter:
        """Start the worker."""
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Wait for the worker to write every queued chunk; raise its error if the block raised none."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None and exc_info[0] is None:
            raise self._error

    def write(self, data: Any) -> int:
        """Queue a copy-free reference to ``data`` (copied first unless it is immutable bytes)."""
        if self._error is not None:
            raise self._error
        chunk = data if isinstance(data, bytes) else bytes(data)
        self._queue.put(chunk)
        return len(chunk)

    def flush(self) -> None:
        """Do nothing: leaving the context waits for every chunk."""

    def _run(self) -> None:
        """Write queued chunks to the target until the end marker; keep the first error."""
        while (chunk := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._target.write(chunk)
                except BaseException as exc:  # noqa: BLE001 - handed to the writing thread
                    self._error = exc


class _WriteOnly:
    """Hide a file's ``tell``/``seek`` so that zipfile writes front to back with data descriptors."""

    def __init__(self, target: IO[bytes]) -> None:
        self._target = target

    def write(self, data: Any) -> int:
        """Write ``data`` to the target."""
        return self._target.write(data)

    def flush(self) -> None:
        """Flush the target."""
        self._target.flush()


def spool() -> tempfile.SpooledTemporaryFile:
    """Return an empty temp file that stays in memory up to SPOOL_MAX bytes, then moves to disk (TMPDIR)."""
    return tempfile.SpooledTemporaryFile(max_size=SPOOL_MAX, prefix="fedcompare-checkpoint-")


def write_npz(arrays: Mapping[str, np.ndarray], fileobj: IO[bytes]) -> None:
    """Write an uncompressed .npz of the named arrays, in the mapping's order, to ``fileobj``.

    Only ``write`` and ``flush`` are used. The bytes are deterministic (fixed zip
    timestamps), so equal arrays hash equally.

    Raises:
        ValueError: a name is empty or an array has object dtype (would need pickle).
    """
    with zipfile.ZipFile(_WriteOnly(fileobj), "w", compression=zipfile.ZIP_STORED) as zf:
        for name, value in arrays.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"expected array names to be non-empty str, got {name!r}")
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)


def read_npz(fileobj: BinaryIO) -> dict[str, np.ndarray]:
    """Return the named arrays of the .npz in a seekable ``fileobj``, in archive order, without unpickling."""
    with np.load(fileobj, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def arrays_to_npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Return the .npz archive of the named arrays as bytes, identical to what write_round stores.

    Raises:
        ValueError: a name is empty or an array has object dtype (would need pickle).
    """
    buf = io.BytesIO()
    write_npz(arrays, buf)
    return buf.getvalue()


def npz_bytes_to_arrays(data: bytes) -> dict[str, np.ndarray]:
    """Return the named arrays of an .npz archive, in archive order, without unpickling."""
    return read_npz(io.BytesIO(data))


_LOCAL_HEADER = struct.Struct("<4s2xHH16xHH")  # signature, flags, method, (time, crc, sizes), name and extra lengths
_LOCAL, _CENTRAL, _DESCRIPTOR = b"PK\x03\x04", b"PK\x01\x02", b"PK\x07\x08"
_NPY_MAGIC = b"\x93NUMPY"


class NpzStreamReader:
    """A write-only file that decodes an uncompressed .npz into arrays as its bytes arrive, front to back.

    Each array's bytes are copied once, straight into the array, so a downloaded model
    needs neither a temp file nor a second copy. Accepts what write_npz and np.savez write
    (stored members, with or without data descriptors). Bytes after a malformed part are
    ignored and ``error`` says why; ``arrays()`` then raises. ``limit`` bounds the bytes
    expected, so a damaged header cannot ask for a huge allocation.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen = 0
        self._pending = bytearray()  # header bytes not parsed yet
        self._state = "local"
        self._arrays: dict[str, np.ndarray] = {}
        self._name = ""
        self._zip64 = False
        self._descriptor = False
        self._flat: np.ndarray | None = None  # the current array's bytes
        self._filled = 0
        self.error: str | None = None

    def write(self, data: Any) -> int:
        """Consume the next bytes of the archive and return how many were given."""
        view = memoryview(data).cast("B")
        self._seen += view.nbytes
        if self.error is None and self._state != "trailer":
            try:
                self._feed(view)
            except (ValueError, SyntaxError, TypeError, KeyError, UnicodeDecodeError, struct.error) as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                self._arrays, self._flat = {}, None
        return view.nbytes

    def flush(self) -> None:
        """Do nothing (nothing is buffered for later)."""

    def arrays(self) -> dict[str, np.ndarray]:
        """Return the decoded arrays in archive order.

        Raises:
            ValueError: the archive was malformed or ended early.
        """
        if self.error is None and self._state != "trailer":
            self.error = f"the archive ended inside a member ({self._state}) after {self._seen} bytes"
        if self.error is not None:
            raise ValueError(self.error)
        return self._arrays

    def _feed(self, view: memoryview) -> None:
        """Advance the parser over ``view``."""
        pos = 0
        while pos < len(view) and self._state != "trailer":
            if self._state == "data":
                pos += self._copy(view[pos:])
                continue
            need = self._needed()
            take = min(need - len(self._pending), len(view) - pos)
            self._pending += view[pos:pos + take]
            pos += take
            if len(self._pending) == need and self._needed() == need:
                self._parse(bytes(self._pending))
                self._pending.clear()

    def _needed(self) -> int:
        """Return how many header bytes the current state needs before it can be parsed."""
        p = self._pending
        if self._state == "local":
            if len(p) < 4 or p[:4] != _LOCAL:
                return 4 if len(p) < 4 else len(p)  # 4 bytes decide; a non-local signature parses as is
            if len(p) < _LOCAL_HEADER.size:
                return _LOCAL_HEADER.size
            _, _, _, name_len, extra_len = _LOCAL_HEADER.unpack_from(p)
            return _LOCAL_HEADER.size + name_len + extra_len
        if self._state == "npy":
            if len(p) < 10:
                return 10
            size_len = 2 if p[6] == 1 else 4
            if len(p) < 8 + size_len:
                return 8 + size_len
            return 8 + size_len + int.from_bytes(p[8:8 + size_len], "little")
        if len(p) < 4:  # descriptor: optional signature, crc, then two 4- or 8-byte sizes
            return 4
        return (4 if p[:4] == _DESCRIPTOR else 0) + 4 + (16 if self._zip64 else 8)

    def _parse(self, header: bytes) -> None:
        """Act on one complete header of the current state."""
        if self._state == "local":
            if header[:4] != _LOCAL:
                if header[:4] != _CENTRAL:
                    raise ValueError(f"expected a zip member or the central directory at byte {self._seen}")
                self._state = "trailer"
                return
            _, flags, method, name_len, extra_len = _LOCAL_HEADER.unpack_from(header)
            if method != zipfile.ZIP_STORED:
                raise ValueError(f"member uses compression method {method}; only stored members stream")
            raw = header[_LOCAL_HEADER.size:_LOCAL_HEADER.size + name_len]
            name = raw.decode("utf-8" if flags & 0x800 else "cp437")
            if not name.endswith(".npy"):
                raise ValueError(f"expected .npy members, got {name[:60]!r}")
            self._name, self._descriptor = name[:-4], bool(flags & 0x08)
            self._zip64 = _has_zip64(header[_LOCAL_HEADER.size + name_len:])
            self._state = "npy"
        elif self._state == "npy":
            self._start_array(header)
        else:
            self._state = "local"

    def _start_array(self, header: bytes) -> None:
        """Allocate the array an .npy header describes and expect its bytes next."""
        if header[:6] != _NPY_MAGIC or header[6] not in (1, 2, 3):
            raise ValueError(f"member {self._name!r} is not an .npy array")
        size_len = 2 if header[6] == 1 else 4
        text = header[8 + size_len:].decode("utf-8" if header[6] == 3 else "latin1")
        described = ast.literal_eval(text)
        dtype = np.lib.format.descr_to_dtype(described["descr"])
        if dtype.hasobject:
            raise ValueError(f"member {self._name!r} holds Python objects, which would need pickle")
        order = "F" if described["fortran_order"] else "C"
        shape = tuple(int(n) for n in described["shape"])
        if min(shape, default=0) < 0:
            raise ValueError(f"member {self._name!r} has a negative dimension in {shape}")
        nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        if nbytes > self._limit:
            raise ValueError(f"member {self._name!r} claims {nbytes} bytes, more than the {self._limit} expected")
        array = np.empty(shape, dtype=dtype, order=order)
        self._arrays[self._name] = array
        self._flat = array.reshape(-1, order=order).view(np.uint8) if nbytes else None
        self._filled = 0
        self._state = "data" if nbytes else self._after_data()

    def _copy(self, view: memoryview) -> int:
        """Copy the current array's next bytes from ``view``; return how many were used."""
        flat = self._flat
        n = min(len(flat) - self._filled, len(view))
        flat[self._filled:self._filled + n] = np.frombuffer(view, dtype=np.uint8, count=n)
        self._filled += n
        if self._filled == len(flat):
            self._flat = None
            self._state = self._after_data()
        return n

    def _after_data(self) -> str:
        """Return the state after a member's data."""
        return "descriptor" if self._descriptor else "local"


def _has_zip64(extra: bytes) -> bool:
    """Return whether a local header's extra field holds a zip64 record (id 1), i.e. 8-byte sizes."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            return True
        pos += 4 + size
    return False


def describe_arrays(arrays: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """Return each array's name, dtype and shape in order, e.g. ``[{"name": "fc.weight", "dtype": "float32", ...}]``."""
    out = []
    for name, value in arrays.items():
        array = np.asanyarray(value)
        dtype = np.lib.format.dtype_to_descr(array.dtype) if array.dtype.names else str(array.dtype)
        out.append({"name": str(name), "dtype": dtype, "shape": list(array.shape)})
    return out

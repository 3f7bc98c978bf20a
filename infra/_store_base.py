"""The Store interface, its errors and key rules, shared by every backend (private; use infra.store)."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from typing import Any, BinaryIO

__all__ = ["CHUNK", "ObjectNotFound", "Store", "StoreError", "TMP_MARK", "check_key", "check_length",
           "copy_exactly", "json_bytes"]

TMP_MARK = ".fedcompare-tmp-"  # prefix of LocalStore's in-flight temp files; never a key
CHUNK = 1 << 20  # bytes per read/write when streaming an object (small enough to pipeline hashing)


class StoreError(RuntimeError):
    """A store operation failed; the message is one line naming the endpoint/path and the fix."""


StoreError.__module__ = "infra.store"  # its public home, as tracebacks and pickles should name it


class ObjectNotFound(KeyError):
    """No object is stored under the key; ``args[0]`` is the key, as for ``KeyError(key)``."""

    def __init__(self, key: str, store_uri: str) -> None:
        super().__init__(key)
        self.key = key
        self.store_uri = store_uri

    def __str__(self) -> str:
        return f"no object {self.key!r} in {self.store_uri}"

    def __reduce__(self) -> tuple:
        return type(self), (self.key, self.store_uri)


ObjectNotFound.__module__ = "infra.store"


class Store(ABC):
    """Flat key -> bytes store; subclasses implement seven primitives, JSON comes for free."""

    uri: str

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing any object there."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Return the bytes under ``key``; raise ObjectNotFound (a KeyError) if there are none."""

    @abstractmethod
    def put_stream(self, key: str, fileobj: BinaryIO, length: int) -> None:
        """Store ``length`` bytes read from ``fileobj`` under ``key``, without holding them all in memory.

        Args:
            key: the object's key.
            fileobj: a readable binary file positioned at the first byte to store; it
                must be seekable where the backend retries (S3 rewinds it before a retry).
            length: how many bytes to read from ``fileobj``.
        Raises:
            ValueError: ``fileobj`` ends before ``length`` bytes, or the key is unsafe.
            StoreError: the backend failed to write; any object already there is kept whole.
        """

    @abstractmethod
    def get_stream(self, key: str, fileobj: BinaryIO) -> int:
        """Write the object under ``key`` into ``fileobj`` (only ``write`` is used) and return its size.

        Args:
            key: the object's key.
            fileobj: a writable binary file; bytes are appended in order, never rewritten.
        Returns:
            The number of bytes written.
        Raises:
            ObjectNotFound: nothing is stored under ``key``.
            StoreError: the backend failed, or the object changed while it was being read.
        """

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Return whether an object is stored under ``key``."""

    @abstractmethod
    def list_keys(self, prefix: str = "") -> list[str]:
        """Return every key starting with ``prefix`` (a plain string prefix), sorted, recursively."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object under ``key``; deleting a missing key does nothing (as on S3)."""

    def put_json(self, key: str, obj: Any) -> None:
        """Store ``obj`` as UTF-8 JSON with sorted keys and indent 2.

        Args:
            key: the object's key.
            obj: any JSON-serializable value.
        Raises:
            TypeError: ``obj`` holds a value JSON cannot encode.
            StoreError: the backend failed to write.
        """
        self.put_bytes(key, json_bytes(obj))

    def get_json(self, key: str) -> Any:
        """Return the JSON value stored under ``key``.

        Args:
            key: the object's key.
        Returns:
            The decoded value.
        Raises:
            ObjectNotFound: nothing is stored under ``key``.
            StoreError: the object is not UTF-8 JSON, or the backend failed.
        """
        data = self.get_bytes(key)
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreError(
                f"object {key!r} in {self.uri} is not UTF-8 JSON ({exc}); "
                "it was written by something else or damaged: rewrite or delete it"
            ) from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


Store.__module__ = "infra.store"


def json_bytes(obj: Any) -> bytes:
    """Encode ``obj`` the way ``Store.put_json`` stores it (sorted keys, indent 2, UTF-8)."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False).encode("utf-8")


def check_key(key: str, *, prefix: bool = False) -> str:
    """Return ``key`` if it is a safe relative '/'-path, else raise ValueError saying why."""
    if not isinstance(key, str):
        raise ValueError(f"store keys are str, got {type(key).__name__} {key!r}")
    if prefix and key == "":
        return key
    parts = key.split("/")
    if prefix:
        parts = parts[:-1]  # a prefix may end in '/' or part of a name
    bad = (
        key == ""
        or key.startswith("/")
        or "\\" in key
        or any(p in ("", ".", "..") or p.startswith(TMP_MARK) for p in parts)
    )
    if bad:
        raise ValueError(
            f"expected a relative '/'-separated key like 'runs/abc/large/manifest.json', got {key!r}: "
            "keys must not start with '/', contain '..', '.', empty parts or backslashes"
        )
    return key


def check_length(length: int) -> int:
    """Return ``length`` if it is a non-negative int, else raise ValueError."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"expected the stream length to be an int >= 0, got {length!r}")
    return length


def copy_exactly(src: BinaryIO, dst: BinaryIO, length: int) -> None:
    """Copy exactly ``length`` bytes from ``src`` to ``dst`` in CHUNK pieces.

    Raises:
        ValueError: ``src`` ends early.
    """
    left = length
    while left:
        data = src.read(min(CHUNK, left))
        if not data:
            raise ValueError(
                f"expected {length} bytes from the stream, got {length - left}: "
                "pass the number of bytes left in it from its current position"
            )
        dst.write(data)
        left -= len(data)

"""Object store: one interface, a local-directory backend and an S3 backend, same key layout.

Keys are '/'-separated paths relative to the store root (``runs/<run_key>/<arm>/...``).
``open_store`` picks the backend from a URI; S3 endpoints and secrets come from the
environment, never from code. ``minio`` is imported only when an S3 store is opened.
The interface lives in ``infra._store_base``, the S3 backend in ``infra._s3``; this module
is their public home.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable
from urllib.parse import unquote, urlsplit

from infra._s3 import DEFAULT_RETRY_SECONDS, S3Store
from infra._store_base import (
    CHUNK, TMP_MARK, ObjectNotFound, Store, StoreError, check_key, check_length, copy_exactly, json_bytes,
)

__all__ = ["ObjectNotFound", "Store", "StoreError", "LocalStore", "S3Store", "json_bytes", "open_store"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_ACCEPTED = "'file:///abs/path', a filesystem path, 's3://bucket' or 's3://bucket/prefix'"


class LocalStore(Store):
    """Store objects as files under a root directory; every write is atomic."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        """Open (and create) the store rooted at ``root``.

        Args:
            root: the directory holding the objects; made absolute and created if missing.
        Raises:
            StoreError: the directory cannot be created.
        """
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the store directory {self.root} ({exc.strerror}): "
                "choose a writable path for the store"
            ) from None

    def _path(self, key: str) -> Path:
        """Return the file path of ``key`` after validating it."""
        return self.root.joinpath(*check_key(key).split("/"))

    def _write_atomically(self, key: str, write: Callable[[BinaryIO], None]) -> None:
        """Run ``write`` on a temp file beside the target, fsync it, then rename it into place."""
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_MARK + path.name + ".")
            try:
                with os.fdopen(fd, "wb") as f:
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise StoreError(
                f"cannot write {path} ({exc.strerror or exc}): check that {self.root} is writable "
                "and has free space"
            ) from None

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write ``data`` to a temp file beside the target, fsync it, then rename it into place."""
        self._write_atomically(key, lambda f: f.write(data))

    def put_stream(self, key: str, fileobj: BinaryIO, length: int) -> None:
        """Copy ``length`` bytes of ``fileobj`` to a temp file beside the target, fsync, rename into place."""
        check_length(length)
        self._write_atomically(key, lambda f: copy_exactly(fileobj, f, length))

    def get_bytes(self, key: str) -> bytes:
        """Return the file's bytes; a missing file or a directory raises ObjectNotFound."""
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key, self.uri) from None
        except OSError as exc:
            raise StoreError(f"cannot read {path} ({exc.strerror}): check its permissions") from None

    def get_stream(self, key: str, fileobj: BinaryIO) -> int:
        """Copy the file into ``fileobj`` and return its size; a missing file raises ObjectNotFound."""
        path = self._path(key)
        try:
            src = path.open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key, self.uri) from None
        except OSError as exc:
            raise StoreError(f"cannot read {path} ({exc.strerror}): check its permissions") from None
        with src:
            try:
                shutil.copyfileobj(src, fileobj, CHUNK)
                return src.tell()
            except OSError as exc:
                raise StoreError(
                    f"cannot copy {path} into the given file ({exc.strerror or exc}): "
                    "check both disks for errors and free space"
                ) from None

    def exists(self, key: str) -> bool:
        """Return whether a file is stored under ``key``."""
        return self._path(key).is_file()

    def list_keys(self, prefix: str = "") -> list[str]:
        """Walk only the directory the prefix points into and return matching keys, sorted."""
        check_key(prefix, prefix=True)
        start = self.root.joinpath(*prefix.split("/")[:-1])
        if not start.is_dir():
            return []
        keys = []
        for dirpath, _dirs, files in os.walk(start):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                if name.startswith(TMP_MARK):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        """Remove the file and prune directories left empty, up to the root."""
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except IsADirectoryError:
            return
        except OSError as exc:
            raise StoreError(f"cannot delete {path} ({exc.strerror}): check its permissions") from None
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


def _env(*names: str) -> str | None:
    """Return the first non-empty value among the environment variables ``names``."""
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def _s3_from_env(bucket: str, prefix: str, retry_seconds: float | None = None) -> S3Store:
    """Build an S3Store for ``bucket``/``prefix`` from the FEDCOMPARE_S3_* environment."""
    raw = _env("FEDCOMPARE_S3_ENDPOINT")
    if raw is None:
        raise StoreError(
            f"s3://{bucket} needs an S3 endpoint, got none: set FEDCOMPARE_S3_ENDPOINT "
            "(e.g. http://127.0.0.1:9000) or use a local store path"
        )
    parts = urlsplit(raw if "://" in raw else f"//{raw}")
    if parts.scheme not in ("", "http", "https") or not parts.netloc or parts.path.strip("/"):
        raise StoreError(
            f"expected FEDCOMPARE_S3_ENDPOINT like 'host:port' or 'http(s)://host:port', got {raw!r}: "
            "drop any path and use http or https"
        )
    flag = (_env("FEDCOMPARE_S3_SECURE") or "").strip().lower()
    if flag not in _TRUE | _FALSE | {""}:
        raise StoreError(f"expected FEDCOMPARE_S3_SECURE to be true or false, got {flag!r}")
    secure = parts.scheme == "https" if parts.scheme else flag in _TRUE | {""}  # unset: https
    if parts.scheme and flag and (flag in _TRUE) != secure:
        raise StoreError(
            f"FEDCOMPARE_S3_ENDPOINT says {parts.scheme}:// but FEDCOMPARE_S3_SECURE={flag!r}: "
            "unset FEDCOMPARE_S3_SECURE or make the two agree"
        )
    access = _env("FEDCOMPARE_S3_ACCESS_KEY", "AWS_ACCESS_KEY_ID")
    secret = _env("FEDCOMPARE_S3_SECRET_KEY", "AWS_SECRET_ACCESS_KEY")
    if (access is None) != (secret is None):
        missing = "FEDCOMPARE_S3_SECRET_KEY" if secret is None else "FEDCOMPARE_S3_ACCESS_KEY"
        raise StoreError(f"S3 credentials come in pairs, but {missing} is unset: set it too")
    return S3Store(
        parts.netloc, bucket, prefix, access_key=access, secret_key=secret,
        secure=secure, region=_env("FEDCOMPARE_S3_REGION"),
        retry_seconds=_retry_seconds() if retry_seconds is None else retry_seconds,
    )


def _retry_seconds() -> float:
    """Return FEDCOMPARE_S3_RETRY_SECONDS as seconds >= 0, or the default when it is unset."""
    raw = _env("FEDCOMPARE_S3_RETRY_SECONDS")
    if raw is None:
        return DEFAULT_RETRY_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise StoreError(
            f"expected FEDCOMPARE_S3_RETRY_SECONDS to be a number of seconds >= 0, got {raw!r}: "
            f"set it like '30', or unset it for the default {DEFAULT_RETRY_SECONDS:.0f}"
        )
    return value


def open_store(uri: str, *, retry_seconds: float | None = None) -> Store:
    """Open the store a URI names.

    Local: ``file:///abs/path`` or a plain filesystem path (relative paths are made
    absolute). S3: ``s3://bucket`` or ``s3://bucket/prefix``, configured by the
    environment: ``FEDCOMPARE_S3_ENDPOINT`` (required; ``host:port`` or
    ``http(s)://host:port``), ``FEDCOMPARE_S3_ACCESS_KEY``/``FEDCOMPARE_S3_SECRET_KEY``
    (falling back to ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``; both unset means
    anonymous), ``FEDCOMPARE_S3_REGION`` (optional). TLS: an ``https://`` or ``http://``
    endpoint scheme decides; without a scheme ``FEDCOMPARE_S3_SECURE`` (true/false)
    decides, and it defaults to true so that secrets never travel in clear by accident.

    Outages: once the store is open, an S3 call that finds the endpoint unreachable or
    gets a 5xx answer is retried with exponential backoff for
    ``FEDCOMPARE_S3_RETRY_SECONDS`` seconds (default 30; 0 disables retries), then raises
    StoreError naming the endpoint and how long it retried. Opening itself is not retried:
    an endpoint that never answered is a wrong setting, reported at once.

    Args:
        uri: the store URI or path.
        retry_seconds: S3 only: how long outages are retried, instead of the environment's
            setting (0 for a glance that must not wait, such as a progress display).
    Returns:
        A LocalStore or an S3Store (whose bucket now exists).
    Raises:
        ValueError: the URI has another scheme or no bucket.
        StoreError: the S3 settings are missing or wrong, or the endpoint is unreachable.
    """
    if "://" not in uri:
        return LocalStore(Path(uri))
    parts = urlsplit(uri)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"expected a local file:///abs/path URI, got host {parts.netloc!r} in {uri!r}")
        return LocalStore(Path(unquote(parts.path)))
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"expected 's3://bucket[/prefix]', got {uri!r}: name the bucket")
        return _s3_from_env(parts.netloc, unquote(parts.path).strip("/"), retry_seconds)
    raise ValueError(f"unsupported store URI {uri!r}: use {_ACCEPTED}")

"""Object store: one interface, a local-directory backend and an S3 backend, same key layout.

Keys are '/'-separated paths relative to the store root (``runs/<run_key>/<arm>/...``).
``open_store`` picks the backend from a URI; S3 endpoints and secrets come from the
environment, never from code. ``minio`` is imported only when an S3 store is opened.
"""

from __future__ import annotations

import json
import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from minio import Minio

__all__ = ["ObjectNotFound", "Store", "StoreError", "LocalStore", "S3Store", "open_store"]

_T = TypeVar("_T")
_TMP_MARK = ".fedcompare-tmp-"  # prefix of LocalStore's in-flight temp files; never a key
_S3_CONNECT_TIMEOUT_S = 5.0
_S3_READ_TIMEOUT_S = 30.0  # per socket read, not per transfer
_S3_RETRIES = 3  # a dead endpoint fails in <= 4 x 5 s plus backoff
_S3_READ_RETRIES = 1  # a hung server fails in <= 2 x 30 s
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_ACCEPTED = "'file:///abs/path', a filesystem path, 's3://bucket' or 's3://bucket/prefix'"


class StoreError(RuntimeError):
    """A store operation failed; the message is one line naming the endpoint/path and the fix."""


class ObjectNotFound(KeyError):
    """No object is stored under the key; ``args[0]`` is the key, as for ``KeyError(key)``."""

    def __init__(self, key: str, store_uri: str) -> None:
        super().__init__(key)
        self.key = key
        self.store_uri = store_uri

    def __str__(self) -> str:
        return f"no object {self.key!r} in {self.store_uri}"


class Store(ABC):
    """Flat key -> bytes store; subclasses implement five primitives, JSON comes for free."""

    uri: str

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing any object there."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Return the bytes under ``key``; raise ObjectNotFound (a KeyError) if there are none."""

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


def json_bytes(obj: Any) -> bytes:
    """Encode ``obj`` the way ``Store.put_json`` stores it (sorted keys, indent 2, UTF-8)."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False).encode("utf-8")


def _check_key(key: str, *, prefix: bool = False) -> str:
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
        or any(p in ("", ".", "..") or p.startswith(_TMP_MARK) for p in parts)
    )
    if bad:
        raise ValueError(
            f"expected a relative '/'-separated key like 'runs/abc/large/manifest.json', got {key!r}: "
            "keys must not start with '/', contain '..', '.', empty parts or backslashes"
        )
    return key


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
        return self.root.joinpath(*_check_key(key).split("/"))

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write ``data`` to a temp file beside the target, fsync it, then rename it into place."""
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TMP_MARK + path.name + ".")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
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

    def get_bytes(self, key: str) -> bytes:
        """Return the file's bytes; a missing file or a directory raises ObjectNotFound."""
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key, self.uri) from None
        except OSError as exc:
            raise StoreError(f"cannot read {path} ({exc.strerror}): check its permissions") from None

    def exists(self, key: str) -> bool:
        """Return whether a file is stored under ``key``."""
        return self._path(key).is_file()

    def list_keys(self, prefix: str = "") -> list[str]:
        """Walk only the directory the prefix points into and return matching keys, sorted."""
        _check_key(prefix, prefix=True)
        start = self.root.joinpath(*prefix.split("/")[:-1])
        if not start.is_dir():
            return []
        keys = []
        for dirpath, _dirs, files in os.walk(start):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                if name.startswith(_TMP_MARK):
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


class S3Store(Store):
    """Store objects in an S3 bucket (MinIO or any S3 endpoint) under an optional prefix."""

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        prefix: str = "",
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        secure: bool = True,
        region: str | None = None,
    ) -> None:
        """Connect to ``endpoint`` and create ``bucket`` if it is missing.

        Args:
            endpoint: ``host:port`` without a scheme (``secure`` picks http or https).
            bucket: the bucket name; created when missing.
            prefix: a key prefix inside the bucket ('' for the bucket root).
            access_key: the S3 access key; None for anonymous access.
            secret_key: the S3 secret key; never shown in messages.
            secure: use https.
            region: the bucket's region; None lets the server tell.
        Raises:
            StoreError: the endpoint cannot be reached or refuses the credentials.
        """
        import certifi
        import urllib3
        from minio import Minio

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = ("https://" if secure else "http://") + endpoint
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=_S3_CONNECT_TIMEOUT_S, read=_S3_READ_TIMEOUT_S),
            maxsize=10,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            retries=urllib3.Retry(
                total=_S3_RETRIES, read=_S3_READ_RETRIES, backoff_factor=0.2,
                status_forcelist=[500, 502, 503, 504],
            ),
        )
        self._client: Minio = Minio(
            endpoint, access_key=access_key, secret_key=secret_key,
            secure=secure, region=region, http_client=http,
        )
        if not self._call("check bucket", "", lambda: self._client.bucket_exists(bucket)):
            self._call("create bucket", "", self._make_bucket)

    def _make_bucket(self) -> None:
        """Create the bucket, tolerating another process creating it first."""
        from minio.error import S3Error

        try:
            self._client.make_bucket(self.bucket)
        except S3Error as exc:
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def _name(self, key: str) -> str:
        """Return the object name of ``key`` inside the bucket."""
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, key: str, fn: Callable[[], _T]) -> _T:
        """Run one client call, turning transport and server errors into one-line StoreErrors."""
        import ssl

        from minio.error import MinioException, S3Error
        from urllib3.exceptions import HTTPError
        from urllib3.exceptions import SSLError as Urllib3SSLError

        target = f"{self.uri}/{key}" if key else self.uri
        try:
            return fn()
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject") and key:
                raise ObjectNotFound(key, self.uri) from None
            raise StoreError(
                f"the S3 store at {self.endpoint_url} refused to {what} {target} "
                f"({exc.code}: {exc.message}): {_s3_fix(exc.code)}"
            ) from None
        except (HTTPError, OSError) as exc:
            tls = any(isinstance(e, (ssl.SSLError, Urllib3SSLError)) for e in _chain(exc))
            fix = ("use an http:// FEDCOMPARE_S3_ENDPOINT for a plain-HTTP server, or point "
                   "SSL_CERT_FILE at its CA" if tls else "start it or set FEDCOMPARE_S3_ENDPOINT")
            raise StoreError(
                f"cannot reach the S3 store at {self.endpoint_url} ({_reason(exc)}): {fix}"
            ) from None
        except MinioException as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise StoreError(
                f"the S3 store at {self.endpoint_url} failed to {what} {target} ({first}): "
                "check that FEDCOMPARE_S3_ENDPOINT points at an S3 server"
            ) from None

    def put_bytes(self, key: str, data: bytes) -> None:
        """Upload ``data`` as one object (S3 makes the write atomic)."""
        import io

        name = self._name(key)
        self._call("write", key, lambda: self._client.put_object(
            self.bucket, name, io.BytesIO(data), len(data),
            content_type="application/octet-stream",
        ))

    def get_bytes(self, key: str) -> bytes:
        """Download the object; a missing one raises ObjectNotFound."""
        name = self._name(key)

        def fetch() -> bytes:
            response = self._client.get_object(self.bucket, name)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._call("read", key, fetch)

    def exists(self, key: str) -> bool:
        """Return whether the object exists (one HEAD request)."""
        name = self._name(key)
        try:
            self._call("stat", key, lambda: self._client.stat_object(self.bucket, name))
        except ObjectNotFound:
            return False
        return True

    def list_keys(self, prefix: str = "") -> list[str]:
        """List objects under the store prefix plus ``prefix``, keys relative to the store root."""
        _check_key(prefix, prefix=True)
        root = f"{self.prefix}/" if self.prefix else ""
        names = self._call("list", prefix, lambda: [
            o.object_name for o in self._client.list_objects(
                self.bucket, prefix=root + prefix, recursive=True)
        ])
        return sorted(n[len(root):] for n in names if n and not n.endswith("/"))

    def delete(self, key: str) -> None:
        """Remove the object; S3 treats a missing key as already deleted."""
        name = self._name(key)
        self._call("delete", key, lambda: self._client.remove_object(self.bucket, name))


def _chain(exc: BaseException) -> list[BaseException]:
    """Return ``exc``, its urllib3 ``reason`` and their causes, outermost first."""
    out: list[BaseException] = []
    for start in (exc, getattr(exc, "reason", None)):
        seen = start if isinstance(start, BaseException) else None
        while seen is not None and seen not in out:
            out.append(seen)
            seen = seen.__cause__ or seen.__context__
    return out


def _reason(exc: BaseException) -> str:
    """Return the root cause of a transport error in a few words, e.g. 'Connection refused'."""
    for seen in _chain(exc):
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
    text = str(getattr(exc, "reason", None) or exc)
    return text.split(">: ", 1)[-1].splitlines()[0] if text else type(exc).__name__


def _s3_fix(code: str | None) -> str:
    """Return the fix to suggest for an S3 error code."""
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken"):
        return "check FEDCOMPARE_S3_ACCESS_KEY and FEDCOMPARE_S3_SECRET_KEY"
    if code in ("InvalidBucketName", "BucketAlreadyExists"):
        return "choose another bucket name in the s3:// store URI"
    if code in ("AuthorizationHeaderMalformed", "InvalidRegion", "IllegalLocationConstraintException"):
        return "set FEDCOMPARE_S3_REGION to the bucket's region"
    return "check the server's log"


def _env(*names: str) -> str | None:
    """Return the first non-empty value among the environment variables ``names``."""
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def _s3_from_env(bucket: str, prefix: str) -> S3Store:
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
    )


def open_store(uri: str) -> Store:
    """Open the store a URI names.

    Local: ``file:///abs/path`` or a plain filesystem path (relative paths are made
    absolute). S3: ``s3://bucket`` or ``s3://bucket/prefix``, configured by the
    environment: ``FEDCOMPARE_S3_ENDPOINT`` (required; ``host:port`` or
    ``http(s)://host:port``), ``FEDCOMPARE_S3_ACCESS_KEY``/``FEDCOMPARE_S3_SECRET_KEY``
    (falling back to ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``; both unset means
    anonymous), ``FEDCOMPARE_S3_REGION`` (optional). TLS: an ``https://`` or ``http://``
    endpoint scheme decides; without a scheme ``FEDCOMPARE_S3_SECURE`` (true/false)
    decides, and it defaults to true so that secrets never travel in clear by accident.

    Args:
        uri: the store URI or path.
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
        return _s3_from_env(parts.netloc, unquote(parts.path).strip("/"))
    raise ValueError(f"unsupported store URI {uri!r}: use {_ACCEPTED}")

"""The S3 backend of the object store: minio calls, multipart uploads, outage retries (private; use infra.store).

``minio`` and ``urllib3`` are imported only when an S3Store is built, so that importing
``infra.store`` stays cheap for local stores.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, BinaryIO, Callable, TypeVar

from infra._store_base import CHUNK, ObjectNotFound, Store, StoreError, check_key, check_length

log = logging.getLogger("fedcompare.store")

__all__ = ["DEFAULT_RETRY_SECONDS", "PART_SIZE", "S3Store"]

_T = TypeVar("_T")
DEFAULT_RETRY_SECONDS = 30.0  # how long an outage (unreachable endpoint, 5xx) is retried
PART_SIZE = 16 << 20  # objects above one part are uploaded in parts of this size (multipart)
_MIN_PART = 5 << 20  # S3's smallest part; minio asks part_size >= this even for one part
_PARALLEL_PARTS = 2  # parts in flight at once; each is held in memory while it uploads
_CONNECT_TIMEOUT_S = 5.0
_READ_TIMEOUT_S = 30.0  # per socket read, not per transfer
_FIRST_BACKOFF_S = 0.25
_MAX_BACKOFF_S = 2.0


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
        retry_seconds: float = DEFAULT_RETRY_SECONDS,
    ) -> None:
        """Connect to ``endpoint`` and create ``bucket`` if it is missing.

        This first contact is not retried: an endpoint that never answered is a
        configuration error to report at once, not an outage to wait out.

        Args:
            endpoint: ``host:port`` without a scheme (``secure`` picks http or https).
            bucket: the bucket name; created when missing.
            prefix: a key prefix inside the bucket ('' for the bucket root).
            access_key: the S3 access key; None for anonymous access.
            secret_key: the S3 secret key; never shown in messages.
            secure: use https.
            region: the bucket's region; None lets the server tell.
            retry_seconds: how long later calls retry an unreachable endpoint or a 5xx answer.
        Raises:
            ValueError: ``retry_seconds`` is negative.
            StoreError: the endpoint cannot be reached or refuses the credentials.
        """
        import certifi
        import urllib3
        from minio import Minio

        if not retry_seconds >= 0:
            raise ValueError(f"expected retry_seconds >= 0, got {retry_seconds!r}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = ("https://" if secure else "http://") + endpoint
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.retry_seconds = float(retry_seconds)
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=_CONNECT_TIMEOUT_S, read=_READ_TIMEOUT_S),
            maxsize=10,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            retries=False,  # _call retries the whole operation; see there why
        )
        self._client: Minio = Minio(
            endpoint, access_key=access_key, secret_key=secret_key,
            secure=secure, region=region, http_client=http,
        )
        exists = self._call("check bucket", "", lambda: self._client.bucket_exists(bucket), retry=False)
        if not exists:
            self._call("create bucket", "", self._make_bucket, retry=False)

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
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, key: str, fn: Callable[[], _T], *, retry: bool = True,
              rewind: Callable[[], None] | None = None) -> _T:
        """Run one client operation, retrying outages until the deadline; raise one-line StoreErrors.

        urllib3's own Retry counts attempts, so how long it waits depends on how an outage
        fails (refused at once, or each connect timing out); users reason in seconds
        ("MinIO restarts within 30 s"), so this loop retries whole operations with
        exponential backoff until ``retry_seconds`` have passed, and the pool retries nothing.
        A whole operation is the unit because a multipart upload or a streamed body cannot be
        replayed request by request: ``rewind`` puts a stream back before each new attempt.
        """
        started = time.monotonic()
        deadline = started + (self.retry_seconds if retry else 0.0)
        delay, attempts = _FIRST_BACKOFF_S, 0
        while True:
            attempts += 1
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified below; unknown errors re-raise as they are
                left = deadline - time.monotonic()
                if not _transient(exc) or left <= 0:
                    waited = time.monotonic() - started if attempts > 1 else None
                    error = self._error(what, key, exc, waited)
                    if error is exc:
                        raise
                    raise error from None
                if attempts == 1:
                    log.warning("the S3 store at %s did not answer (%s); retrying for up to %.0f s",
                                self.endpoint_url, type(exc).__name__, left)
            time.sleep(min(delay, left))
            delay = min(2 * delay, _MAX_BACKOFF_S)
            if rewind is not None:
                rewind()

    def _error(self, what: str, key: str, exc: Exception, waited: float | None) -> Exception:
        """Return the one-line StoreError (or ObjectNotFound) for a failed call; ``exc`` if unknown."""
        import ssl

        from minio.error import MinioException, S3Error
        from urllib3.exceptions import HTTPError
        from urllib3.exceptions import SSLError as Urllib3SSLError

        target = f"{self.uri}/{key}" if key else self.uri
        retried = f" after retrying for {waited:.0f} s" if waited is not None else ""
        knob = " (FEDCOMPARE_S3_RETRY_SECONDS sets how long to retry)" if waited is not None else ""
        if isinstance(exc, S3Error):
            if exc.code in ("NoSuchKey", "NoSuchObject") and key:
                return ObjectNotFound(key, self.uri)
            return StoreError(
                f"the S3 store at {self.endpoint_url} refused to {what} {target} "
                f"({exc.code}: {exc.message}){retried}: {_s3_fix(exc.code)}{knob}"
            )
        if isinstance(exc, (HTTPError, ConnectionError, TimeoutError)):  # other OSErrors are local (disk)
            tls = any(isinstance(e, (ssl.SSLError, Urllib3SSLError)) for e in _chain(exc))
            fix = ("use an http:// FEDCOMPARE_S3_ENDPOINT for a plain-HTTP server, or point "
                   "SSL_CERT_FILE at its CA" if tls else "start it or set FEDCOMPARE_S3_ENDPOINT")
            return StoreError(
                f"cannot reach the S3 store at {self.endpoint_url} to {what} {target} "
                f"({_reason(exc)}){retried}: {fix}{knob}"
            )
        if isinstance(exc, MinioException):
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return StoreError(
                f"the S3 store at {self.endpoint_url} failed to {what} {target} ({first}){retried}: "
                f"check that FEDCOMPARE_S3_ENDPOINT points at an S3 server{knob}"
            )
        return exc

    def _put(self, name: str, fileobj: BinaryIO, length: int) -> Any:
        """Upload ``length`` bytes of ``fileobj``: one request up to PART_SIZE, multipart above."""
        part_size = PART_SIZE if length > PART_SIZE else max(length, _MIN_PART)
        return self._client.put_object(
            self.bucket, name, fileobj, length, content_type="application/octet-stream",
            part_size=part_size, num_parallel_uploads=_PARALLEL_PARTS,
        )

    def put_bytes(self, key: str, data: bytes) -> None:
        """Upload ``data`` as one object (S3 makes the write atomic)."""
        import io

        name = self._name(key)
        self._call("write", key, lambda: self._put(name, io.BytesIO(data), len(data)))

    def put_stream(self, key: str, fileobj: BinaryIO, length: int) -> None:
        """Upload ``length`` bytes from ``fileobj`` (multipart above PART_SIZE), rewinding it before a retry."""
        name = self._name(key)
        body = _ExactReader(fileobj, check_length(length))
        self._call("write", key, lambda: self._put(name, body, length), rewind=body.rewind)

    def get_bytes(self, key: str) -> bytes:
        """Download the object; a missing one raises ObjectNotFound."""
        import io

        buf = io.BytesIO()
        self.get_stream(key, buf)
        return buf.getvalue()

    def get_stream(self, key: str, fileobj: BinaryIO) -> int:
        """Download the object into ``fileobj``; a retry resumes where the broken transfer stopped.

        The resumed request carries ``If-Match`` with the first answer's ETag, so an object
        replaced meanwhile fails (412) instead of splicing two versions together.
        """
        name = self._name(key)
        state: dict[str, Any] = {"done": 0, "etag": None, "size": None}

        def fetch() -> int:
            """Download from where the last attempt stopped; return the bytes written so far."""
            if state["size"] is not None and state["done"] >= state["size"]:
                return state["done"]
            headers = {"If-Match": state["etag"]} if state["etag"] else None
            response = self._client.get_object(self.bucket, name, offset=state["done"],
                                               request_headers=headers)
            try:
                if state["etag"] is None:
                    state["etag"] = response.headers.get("ETag")
                    length = response.headers.get("Content-Length")
                    state["size"] = int(length) if length is not None else None
                for chunk in response.stream(CHUNK):
                    fileobj.write(chunk)
                    state["done"] += len(chunk)
            finally:
                response.close()
                response.release_conn()
            return state["done"]

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
        check_key(prefix, prefix=True)
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


class _ExactReader:
    """A read-only view of the next ``length`` bytes of a stream that can go back to its start."""

    def __init__(self, fileobj: BinaryIO, length: int) -> None:
        self._file, self._length = fileobj, length
        seekable = getattr(fileobj, "seekable", None)
        self._start = fileobj.tell() if seekable is not None and seekable() else None
        self._read = 0

    def read(self, size: int = -1) -> bytes:
        """Return up to ``size`` of the remaining bytes; raise ValueError if the stream ends early."""
        want = self._length - self._read if size is None or size < 0 else min(size, self._length - self._read)
        data = self._file.read(want) if want else b""
        if want and not data:
            raise ValueError(
                f"expected {self._length} bytes from the stream, got {self._read}: "
                "pass the number of bytes left in it from its current position"
            )
        self._read += len(data)
        return data

    def rewind(self) -> None:
        """Go back to where the upload started, for a retry."""
        if self._start is None:
            raise ValueError("cannot retry an upload from a stream that cannot seek: pass a seekable file")
        self._file.seek(self._start)
        self._read = 0


def _status(exc: BaseException) -> int:
    """Return the HTTP status a minio error carries, or 0."""
    from minio.error import InvalidResponseError, S3Error, ServerError

    if isinstance(exc, S3Error):
        return getattr(exc.response, "status", 0) or 0
    if isinstance(exc, ServerError):
        return exc.status_code
    if isinstance(exc, InvalidResponseError):
        return int(getattr(exc, "_code", 0) or 0)  # minio keeps the status only there
    return 0


def _transient(exc: BaseException) -> bool:
    """Return whether ``exc`` is an outage worth retrying: unreachable, dropped, timed out, or 5xx."""
    import ssl

    from urllib3.exceptions import (
        MaxRetryError, NewConnectionError, ProtocolError, SSLError, TimeoutError as Urllib3Timeout,
    )

    if _status(exc) >= 500:
        return True
    chain = _chain(exc)
    if any(isinstance(e, (ssl.SSLError, SSLError)) for e in chain):
        return False  # a TLS mismatch is configuration; waiting will not fix it
    transport = (MaxRetryError, NewConnectionError, ProtocolError, Urllib3Timeout, ConnectionError, TimeoutError)
    return isinstance(exc, transport)


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
    if code == "PreconditionFailed":
        return "the object was replaced while it was read; read it again"
    return "check the server's log"

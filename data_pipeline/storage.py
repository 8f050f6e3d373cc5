"""Local and S3 storage behind one small interface, with retries and clear errors.

``s3://`` goes through s3fs with the standard AWS credential chain (environment, shared files, profiles,
instance roles); the endpoint comes from ``data.endpoint_url`` or ``AWS_ENDPOINT_URL(_S3)`` so MinIO, Ceph,
SeaweedFS or R2 work too. Reads are direct (no ``pipe:`` subprocesses). Transient failures are retried with
exponential backoff; permanent ones become a :class:`StorageError` that says what to fix. Credentials are
never logged.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass

from . import local_files

log = logging.getLogger(__name__)

_TRANSIENT_NAMES = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ClientPayloadError", "ServerDisconnectedError", "ClientOSError", "FSTimeoutError", "ResponseStreamingError",
    "IncompleteRead", "IncompleteReadError", "ProtocolError", "HTTPClientError", "ClientConnectorError",
}
# s3fs turns S3's 500 InternalError into OSError(EREMOTEIO) and 503 SlowDown / ServiceUnavailable into EBUSY, with
# S3's message ("We encountered an internal error, please try again.") as the only text
_TRANSIENT_ERRNOS = (errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE, errno.EBUSY,
                     getattr(errno, "EREMOTEIO", errno.EIO))
_TRANSIENT_TEXT = ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "503", "500 ", "Throttl")


_INHERITED: list = []


class StorageError(RuntimeError):
    """A permanent storage failure, phrased for the person who has to fix it."""


def without_userinfo(text: str) -> str:
    """``text`` with the ``user:password@`` of every URL in it removed: never logged, printed or saved. A password
    may hold ``/`` and ``@`` (AWS secret keys do), so it runs to the last ``@`` of the word."""
    return re.sub(r"//[^/@\s:]*:\S*@|//[^/@\s]*@", "//", text)


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def summary(urls: list[str]) -> str:
    """``"12 files, e.g. shard-000000.tar"`` or ``"1 file: notes.txt"`` for what a listing found."""
    names = [u.rstrip("/").rsplit("/", 1)[-1] for u in urls]
    first = next((n for n in names if not n.startswith(".")), names[0])
    return f"1 file: {first}" if len(urls) == 1 else f"{len(urls)} files, e.g. {first}"


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: connection resets, timeouts, throttling and 5xx answers."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, StorageError)):
        return False
    for e in (exc, exc.__cause__, exc.__context__):
        if e is None:
            continue
        if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__name__ in _TRANSIENT_NAMES:
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
    status = _status(exc)
    return status is not None and (status >= 500 or status == 429) or any(t in str(exc) for t in _TRANSIENT_TEXT)


def _chain(exc: BaseException) -> list[BaseException]:
    return [e for e in (exc, exc.__cause__, exc.__context__) if e is not None]


def is_unreachable(exc: BaseException) -> bool:
    """Nothing answered at the endpoint's address (connection refused, unknown host)."""
    names = ("EndpointConnectionError", "ClientConnectorError")
    return any(isinstance(e, ConnectionRefusedError) or type(e).__name__ in names for e in _chain(exc))


def is_timeout(exc: BaseException) -> bool:
    """The server took the connection but gave no answer (or no more bytes) in time."""
    names = ("ReadTimeoutError", "ConnectTimeoutError", "FSTimeoutError", "ServerTimeoutError")
    return any(isinstance(e, TimeoutError) or type(e).__name__ in names
               or isinstance(e, OSError) and e.errno == errno.ETIMEDOUT for e in _chain(exc))


def _status(exc: BaseException) -> int | None:
    """The HTTP status of S3's answer, where botocore's error (before s3fs renames it) or its errno says it."""
    for e in _chain(exc):
        status = (getattr(e, "response", None) or {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(status, int):
            return status
        if isinstance(e, OSError) and e.errno in (errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO)):
            return 500
    return None


@dataclass
class Storage:
    """A file system rooted at nothing in particular; every path given to it is a full URL or local path."""

    endpoint_url: str = ""
    retries: int = 4
    backoff: float = 0.5
    timeout: float = 20.0  # per request: connecting, and waiting for an answer or more bytes
    outage: float = 60.0  # retries go on for at least this long (an object store restarting), backoff capped at 8 s

    def __post_init__(self):
        self._s3, self._pid = None, 0
        self._reached = False  # has the S3 endpoint ever answered? (see retry)
        self.endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""

    def __getstate__(self):  # the s3fs client is rebuilt in each process (DataLoader workers fork)
        return {k: v for k, v in self.__dict__.items() if k != "_s3"} | {"_s3": None}

    @property
    def s3(self):
        if self._s3 is None or self._pid != os.getpid():  # a forked DataLoader worker needs its own client
            if self._s3 is not None:
                _INHERITED.append(self._s3)  # never closed here: its event loop lives in the parent process
            self._pid = os.getpid()
            import s3fs  # noqa: PLC0415 (only S3 users pay for the import)

            # botocore's two attempts per call and none of s3fs's own: with s3fs's and a 60 s timeout they multiplied
            # ours, so a server that accepts connections and never answers stalled training for minutes without a
            # word; ours log each retry
            self._s3 = s3fs.S3FileSystem(
                endpoint_url=self.endpoint or None, skip_instance_cache=True,
                config_kwargs={"connect_timeout": min(10.0, self.timeout), "read_timeout": self.timeout,
                               "retries": {"max_attempts": 2}},
            )
            self._s3.retries = 1
        return self._s3

    def _fs_path(self, url: str):
        if is_s3(url):
            return self.s3, url[len("s3://"):]
        return None, url

    # -- errors and retries -------------------------------------------------------------------------------
    def explain(self, exc: BaseException, url: str, action: str) -> StorageError:
        """Turn a low-level exception into a StorageError naming the URL and the likely fix."""
        where = f"{action} {without_userinfo(url)}"
        name = type(exc).__name__
        text = str(exc)
        if name in ("NoCredentialsError", "PartialCredentialsError"):
            msg = ("no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                   "or ~/.aws/credentials")
        elif name == "ProfileNotFound":
            msg = f"{text}: AWS_PROFILE names a profile that ~/.aws/credentials and ~/.aws/config do not have"
        elif "bucket does not exist" in text or "NoSuchBucket" in text:
            msg = f"bucket {url[5:].split('/')[0]!r} does not exist at {self.endpoint or 'AWS S3'}"
        elif isinstance(exc, PermissionError) and not is_s3(url):
            msg = f"permission denied for this user; check the owner and mode of {url}"
        elif isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
            msg = f"access denied ({text}); check the credentials and the bucket policy"
        elif isinstance(exc, FileNotFoundError):
            msg = "no such file or object"
        elif _status(exc) == 400 or "Bad Request" in text or "ExpiredToken" in text:
            msg = (f"the request was refused as bad ({name}: {text}); most often the credentials have expired "
                   "(AWS_SESSION_TOKEN) or are invalid, or the region is wrong (AWS_REGION)")
        elif is_transient(exc) and (_status(exc) or 0) >= 500:
            msg = (f"the storage service answered with an error on every try ({name}: {text}); it is failing: see "
                   "its status or logs")
        elif is_transient(exc) and is_timeout(exc):
            msg = (f"the storage endpoint {self.endpoint or 'of AWS S3'} took the connection but did not answer "
                   f"within {self.timeout:g} s (data.io_timeout); check that the server is up and not overloaded, "
                   "and the endpoint URL (data.endpoint_url, --endpoint-url or AWS_ENDPOINT_URL)")
        elif is_transient(exc):
            msg = (f"cannot reach the storage endpoint {self.endpoint or 'of AWS S3'} ({name}: {text}); check the "
                   "endpoint URL (data.endpoint_url, --endpoint-url or AWS_ENDPOINT_URL) and that the server is up")
        else:
            msg = f"{name}: {text}"
        return StorageError(without_userinfo(f"{where}: {msg}"))

    def retry(self, fn, url: str, action: str):
        """Call ``fn()``; retry transient errors with exponential backoff, ``retries`` times and for at least
        ``outage`` seconds, and explain permanent ones.

        An endpoint that has never answered, refusing connections or leaving them unanswered (botocore has already
        tried twice), is most likely a wrong URL or a server that is down, so it fails at once instead of after
        the whole backoff schedule."""
        start, attempt = time.monotonic(), 0
        while True:
            try:
                result = fn()
                self._reached = True
                return result
            except Exception as exc:  # noqa: BLE001 (classified below)
                more = attempt < self.retries or self.retries > 0 and time.monotonic() - start < self.outage
                first_contact = not self._reached and (is_unreachable(exc) or is_timeout(exc))
                if not is_transient(exc) or not more or first_contact:
                    raise self.explain(exc, url, action) from exc
                delay = min(self.backoff * 2**attempt, 8.0)
                attempt += 1
                log.warning("%s %s failed (%s: %s); retry %d in %.1fs", action, url, type(exc).__name__, exc,
                            attempt, delay)
                time.sleep(delay)

    # -- operations ------------------------------------------------------------------------------------
    def exists(self, url: str) -> bool:
        fs, path = self._fs_path(url)
        if fs is None:
            return os.path.exists(path)
        return self.retry(lambda: fs.exists(path), url, "checking")

    def size(self, url: str) -> int | None:
        """Bytes in a file or object; None where there is none."""
        fs, path = self._fs_path(url)
        if fs is None:
            return os.path.getsize(path) if os.path.isfile(path) else None

        def size():
            try:
                return fs.size(path)
            except FileNotFoundError:
                return None
        return self.retry(size, url, "checking")

    def read_bytes(self, url: str) -> bytes:
        fs, path = self._fs_path(url)
        if fs is None:
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError as exc:
                raise self.explain(exc, url, "reading") from exc
        return self.retry(lambda: fs.cat_file(path), url, "reading")

    def write_bytes(self, url: str, data: bytes) -> None:
        """Write atomically: readers see the old object or the whole new one."""
        fs, path = self._fs_path(url)
        if fs is None:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            local_files.write_atomic(path, data)  # looked up here: the fault injector patches it
            return
        self.retry(lambda: fs.pipe_file(path, data), url, "writing")

    def remove(self, url: str) -> None:
        """Delete one file or object; nothing there is no error."""
        fs, path = self._fs_path(url)
        if fs is None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            return
        self.retry(lambda: fs.rm_file(path), url, "deleting")

    def put_file(self, local: str, url: str) -> None:
        """Move a finished local file to ``url`` (rename locally, upload to S3: both atomic for readers)."""
        if is_s3(url):
            self.upload(local, url)
            os.remove(local)
            return
        os.makedirs(os.path.dirname(url) or ".", exist_ok=True)
        shutil.move(local, url)

    def upload(self, local: str, url: str) -> None:
        """Copy a local file to ``url`` (local paths too), keeping the local file."""
        fs, path = self._fs_path(url)
        if fs is None:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            shutil.copyfile(local, path + ".tmp")
            os.replace(path + ".tmp", path)
            return
        self.retry(lambda: fs.put_file(local, path), url, "uploading")

    def download(self, url: str, local: str) -> None:
        """Copy ``url`` to a local file, atomically (a partial download never has the final name)."""
        fs, path = self._fs_path(url)
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        tmp = f"{local}.part{os.getpid()}"
        if fs is None:
            shutil.copyfile(path, tmp)
        else:
            self.retry(lambda: fs.get_file(path, tmp), url, "downloading")
        os.replace(tmp, local)

    def list(self, url: str, suffix: str = "") -> list[str]:
        """Full URLs of the files directly under the folder or prefix ``url`` ending in ``suffix``, sorted."""
        fs, path = self._fs_path(url)
        if fs is None:
            if not os.path.isdir(path):
                raise StorageError(f"listing {url}: no such folder")
            names = [os.path.join(path, n) for n in os.listdir(path)]
        else:
            # refresh: s3fs caches listings, and a checkpoint prefix changes while a run lists it again
            found = self.retry(lambda: fs.ls(path.rstrip("/"), detail=False, refresh=True), url, "listing")
            names = ["s3://" + p for p in found]
        return sorted(n for n in names if n.endswith(suffix))

    def contents(self, url: str) -> list[str]:
        """Full URLs of everything at ``url``: the entries of a folder or of the prefix ``url/`` (so
        ``s3://b/data2`` is not under ``s3://b/data``), ``[url]`` for a single file, ``[]`` when nothing is there."""
        fs, path = self._fs_path(url)
        if fs is None:
            if os.path.isdir(path):
                return sorted(os.path.join(path, n) for n in os.listdir(path))
            return [path] if os.path.lexists(path) else []
        self.check_bucket(url)

        def ls():
            try:
                return fs.ls(path.rstrip("/"), detail=False, refresh=True)
            except FileNotFoundError:
                return []

        return sorted("s3://" + p for p in self.retry(ls, url, "listing"))

    def check_bucket(self, url: str, action: str = "listing") -> None:
        """Raise a StorageError naming the bucket of S3 ``url`` unless it exists and may be listed."""
        bucket = url[len("s3://"):].split("/")[0]
        self.retry(lambda: self.s3.call_s3("list_objects_v2", Bucket=bucket, MaxKeys=1), url, action)

    def check_writable(self, url: str) -> None:
        """Fail early with a clear message when the destination bucket is missing or not writable."""
        if not is_s3(url):
            try:
                os.makedirs(url, exist_ok=True)
                tempfile.TemporaryFile(dir=url).close()
            except OSError as exc:
                raise self.explain(exc, url, "writing") from None
            return
        self.check_bucket(url)  # listing: a remote checkpoint is found by it
        probe = join(url, ".hpdm-write-check")
        self.write_bytes(probe, b"ok")
        try:
            self.remove(probe)
        except StorageError as exc:
            raise StorageError(f"{exc} (hpdm deletes what it wrote there, such as old checkpoints: the credentials "
                               "need to delete objects as well as to list, read and write them)") from exc

    def open(self, url: str, offset: int = 0, block_size: int = 8 << 20) -> "RetryingReader":
        """A sequential reader from byte ``offset``; S3 reads ahead ``block_size`` bytes per request."""
        return RetryingReader(self, url, offset, block_size)

    def local_tmpdir(self, dest: str) -> str:
        """A scratch folder on the same file system as local ``dest`` (so renames are atomic), named for this host
        and process; those of processes on this host that are gone (killed mid-write) are removed first."""
        base = None if is_s3(dest) else dest
        if base:
            os.makedirs(base, exist_ok=True)
            local_files.remove_orphaned_tmpdirs(base)
        return tempfile.mkdtemp(prefix=f".hpdm-tmp-{socket.gethostname()}-{os.getpid()}-", dir=base)


class RetryingReader:
    """A sequential binary reader that reopens at its position after a transient error.

    ``fetch_seconds`` accumulates the time spent waiting for bytes (the benchmark's "fetch" column).
    """

    def __init__(self, storage: Storage, url: str, offset: int = 0, block_size: int = 8 << 20):
        self.storage, self.url, self.pos, self.block_size = storage, url, offset, block_size
        self.fetch_seconds = 0.0
        self._f = None
        self._reopen()

    def _reopen(self):
        if self._f is not None:
            try:
                self._f.close()
            except Exception:  # noqa: BLE001 (a broken handle is being replaced anyway)
                pass
        fs, path = self.storage._fs_path(self.url)

        def do_open():
            f = open(path, "rb") if fs is None else fs.open(path, "rb", block_size=self.block_size, cache_type="readahead")
            f.seek(self.pos)
            return f

        self._f = self.storage.retry(do_open, self.url, "opening")

    def read(self, n: int = -1) -> bytes:
        t = time.perf_counter()
        for attempt in range(self.storage.retries + 1):
            try:
                data = self._f.read(n)
                break
            except Exception as exc:  # noqa: BLE001 (classified below)
                if not is_transient(exc) or attempt == self.storage.retries:
                    raise self.storage.explain(exc, self.url, f"reading at byte {self.pos} of") from exc
                log.warning("reading %s at byte %d failed (%s); reopening", self.url, self.pos, type(exc).__name__)
                time.sleep(self.storage.backoff * 2**attempt)
                self._reopen()
        self.pos += len(data)
        self.fetch_seconds += time.perf_counter() - t
        return data

    def tell(self) -> int:
        return self.pos

    def close(self):
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

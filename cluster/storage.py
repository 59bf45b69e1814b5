"""Object storage for outputs, through fsspec (local, s3://, gs://, memory://, ...).

One small class so that the driver and the replicas write the output layout the
same way (system-design.md, "Output layout"):

- every key is built by `path()`, which refuses anything that could leave the
  prefix: defence in depth behind the sanitised video ids;
- writes are atomic where the backend allows, because a record's existence is
  the commit marker: local files go to a temporary name and `os.replace`, object
  stores get one PUT (or one completed multipart upload) per object;
- transient errors are retried a bounded number of times with backoff, long
  enough (minutes) to ride out a storage outage rather than fail the work;
- files land with the permissions of a normal file (0644 under the usual umask),
  not the 0600 of a temporary file: a dataset is read by a team;
- credentials come only from the environment or the cloud credential chain of
  the process that uses them (the driver's own, each node's own for its replicas),
  never through arguments, so they cannot end up in a repr, a log, a pickle or
  Ray's object store.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from typing import Any, BinaryIO, Callable, Iterator, TypeVar

import fsspec
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import ReadTimeoutError
from fsspec.core import split_protocol
from fsspec.implementations.local import LocalFileSystem

from .faults import StorageUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

S3_PROTOCOLS = ("s3", "s3a")
S3_ENDPOINT_ENV = ("MEMFLOW_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
# The environment through which a process reaches object storage (endpoint and credentials).
STORAGE_ENV = S3_ENDPOINT_ENV + ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                                 "AWS_REGION", "AWS_DEFAULT_REGION")
# Options that would carry a secret; refused so that secrets only live in the env/chain.
SECRET_OPTIONS = frozenset({"key", "secret", "token", "password", "username",
                            "aws_access_key_id", "aws_secret_access_key", "aws_session_token"})
TMP_PREFIX = ".memflow-tmp-"
# Not worth retrying: the answer will be the same next time.
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
_TRANSIENT = (OSError, BotoConnectionError, ReadTimeoutError)


def storage_options(url: str, endpoint_url: str | None = None, **options: Any) -> dict[str, Any]:
    """fsspec options for `url`: the S3 endpoint (argument, else env) for s3:// (other
    protocols ignore it: one job may read from S3 and write locally), listings cache
    off (other processes commit records we must see), no secrets in options or in the URL."""
    bad = SECRET_OPTIONS & options.keys()
    if bad:
        raise ValueError(f"credential options {sorted(bad)} are not accepted; provide credentials "
                         "through the environment or the cloud credential chain")
    if re.match(r"[A-Za-z][\w+.-]*://[^/@:]*:[^@]*@", url):  # user:secret@, secrets may hold "/"
        raise ValueError("credentials in the URL are not accepted; provide them through the "
                         "environment or the cloud credential chain")
    protocol = split_protocol(url)[0] or "file"
    opts = dict(options)
    endpoint_url = endpoint_url or opts.pop("endpoint_url", None)
    if protocol in S3_PROTOCOLS:
        endpoint = s3_endpoint(endpoint_url)
        if endpoint:
            opts["endpoint_url"] = endpoint
        opts.setdefault("use_listings_cache", False)
    return opts


def s3_endpoint(endpoint_url: str | None = None) -> str | None:
    """The S3 endpoint: the argument, else the first of S3_ENDPOINT_ENV that is set."""
    return endpoint_url or next((os.environ[v] for v in S3_ENDPOINT_ENV if os.environ.get(v)), None)


def _file_mode() -> int:
    """0666 less this process's umask: what open() gives a new file (mkstemp gives 0600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


class Storage:
    """A root prefix (file://, plain path, s3://bucket/prefix, memory://, gs://, ...)
    and atomic, retried operations on keys relative to it."""

    def __init__(self, url: str, endpoint_url: str | None = None, *, retries: int = 10,
                 backoff_s: float = 0.5, **options: Any):
        if not url:
            raise ValueError("storage URL is empty")
        self.url = url
        self._options = storage_options(url, endpoint_url, **options)
        self.fs, root = fsspec.core.url_to_fs(url, **self._options)
        self.root = root.rstrip("/") or "/"
        self.local = isinstance(self.fs, LocalFileSystem)
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol
        self._one_request = {"max_concurrency": 1} if "s3" in protocols else {}  # s3fs's own option
        self.retries = retries
        self.backoff_s = backoff_s
        self.on_retry: Callable[[], Any] | None = None  # told of each retry: waiting on storage is not a hang

    @property
    def endpoint_url(self) -> str | None:
        """The S3 endpoint this storage talks to (configuration, not a credential)."""
        return self._options.get("endpoint_url")

    def __repr__(self) -> str:
        endpoint = self._options.get("endpoint_url")
        return f"Storage({self.url!r}" + (f", endpoint_url={endpoint!r})" if endpoint else ")")

    __str__ = __repr__

    def __reduce__(self):
        # Rebuild on the other side (Ray actors) instead of pickling a live filesystem.
        return (_rebuild, (self.url, self._options, self.retries, self.backoff_s))

    # -- keys -----------------------------------------------------------------

    def path(self, *parts: str) -> str:
        """The backend path of a key under the root; refuses keys that could escape it."""
        names = []
        for part in parts:
            if not isinstance(part, str) or not part:
                raise ValueError(f"storage key part {part!r} is empty or not a string")
            if "\\" in part or any(ord(c) < 32 or ord(c) == 127 for c in part):
                raise ValueError(f"storage key {part!r} contains a backslash or control character")
            if part.startswith("/") or "://" in part:
                raise ValueError(f"storage key {part!r} is absolute; keys are relative to {self.url}")
            for name in part.split("/"):
                if name in ("", ".", ".."):
                    raise ValueError(f"storage key {part!r} has an empty, '.' or '..' component")
                names.append(name)
        return "/".join([self.root.rstrip("/")] + names) if names else self.root

    def url_for(self, rel: str) -> str:
        """The full URL of a key, for records and manifests."""
        return self.fs.unstrip_protocol(self.path(rel))

    # -- reads ----------------------------------------------------------------

    def exists(self, rel: str) -> bool:
        return self._retry(self.fs.exists, self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self._retry(self.fs.cat_file, self.path(rel))

    def read_text(self, rel: str) -> str:
        """A small document (a record, a listing) in one request: s3fs would first ask for
        the size (a HEAD) to read a large object in parallel ranges."""
        return self._retry(self.fs.cat_file, self.path(rel), **self._one_request).decode("utf-8")

    def list(self, rel_dir: str = "") -> list[str]:
        """Sorted names directly under a prefix; a missing prefix is empty."""
        p = self.path(rel_dir) if rel_dir else self.root
        try:
            entries = self._retry(self.fs.ls, p, detail=False)
        except FileNotFoundError:
            return []
        names = (e.rstrip("/").rsplit("/", 1)[-1] for e in entries)
        return sorted(n for n in names if n and not n.startswith(TMP_PREFIX))

    # -- writes ---------------------------------------------------------------

    def write_bytes(self, rel: str, data: bytes) -> None:
        p = self.path(rel)
        if self.local:
            self._retry(self._local_atomic, p, lambda f: f.write(data))
        else:
            self._retry(self.fs.pipe_file, p, data)  # one PUT: atomic on object stores

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_text(rel, json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n")

    def upload_file(self, local_path: str | os.PathLike, rel: str) -> None:
        p = self.path(rel)
        if self.local:
            self._retry(self._local_atomic, p, lambda f: _copy_into(local_path, f))
        else:
            # s3fs: one PUT, or a multipart upload that only appears when completed.
            self._retry(self.fs.put_file, os.fspath(local_path), p)

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[BinaryIO]:
        """A binary file to stream a large object into; it appears at `rel` only
        if the block ends without an exception.

        Non-local backends spool to a local temporary file and upload it on close:
        a finished file can be retried as a whole, a half-sent stream cannot."""
        p = self.path(rel)
        if self.local:
            with self._local_tmp(p) as f:
                yield f
            return
        with tempfile.NamedTemporaryFile(prefix=TMP_PREFIX) as f:
            yield f
            f.flush()
            self.upload_file(f.name, rel)

    def delete(self, rel: str) -> None:
        """Remove a key; a missing key is fine (a retried delete may have succeeded)."""
        try:
            self._retry(self.fs.rm_file, self.path(rel))
        except FileNotFoundError:
            pass

    def delete_folder(self, rel: str) -> None:
        """Remove every key under a prefix (and, locally, the folder); a missing one is fine."""
        try:
            self._retry(self.fs.rm, self.path(rel), recursive=True)
        except FileNotFoundError:
            pass

    # -- helpers --------------------------------------------------------------

    def _local_atomic(self, path: str, fill: Callable[[BinaryIO], Any]) -> None:
        with self._local_tmp(path) as f:
            fill(f)

    @contextlib.contextmanager
    def _local_tmp(self, path: str) -> Iterator[BinaryIO]:
        """A temporary file beside `path`, renamed onto it on success, removed on error."""
        parent, name = os.path.split(path)
        os.makedirs(parent, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{name}-", dir=parent)
        try:
            os.fchmod(fd, _file_mode())
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _retry(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return call_with_retries(fn, *args, retries=self.retries, backoff_s=self.backoff_s, on_retry=self.on_retry,
                                 **kwargs)


def call_with_retries(fn: Callable[..., T], *args: Any, retries: int = 10, backoff_s: float = 0.5,
                      on_retry: Callable[[], Any] | None = None, **kwargs: Any) -> T:
    """Call fn, retrying transient errors with capped exponential backoff and jitter
    (with the default 10 retries: 1 to 2.5 minutes in all before the error is raised)."""
    attempt = 0
    while True:
        try:
            return fn(*args, **kwargs)
        except _PERMANENT:
            raise
        except _TRANSIENT as e:
            if attempt >= retries:
                raise StorageUnavailable(f"storage {getattr(fn, '__name__', 'op')} kept failing after {retries} "
                                         f"retries: {type(e).__name__}: {e}") from e
            delay = min(backoff_s * 2 ** attempt, 30.0) * (0.5 + random.random() / 2)
            attempt += 1
            log.warning("storage %s failed (%s: %s); retry %d/%d in %.1fs", getattr(fn, "__name__", "op"),
                        type(e).__name__, e, attempt, retries, delay)
            if on_retry is not None:
                on_retry()
            time.sleep(delay)


def read_url(url: str, endpoint_url: str | None = None) -> bytes:
    """One object at any fsspec URL (a record or latents of another output), retried as
    Storage's reads are; FileNotFoundError when it is not there."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options(url, endpoint_url))
    return call_with_retries(fs.cat_file, path)


def _rebuild(url: str, options: dict, retries: int, backoff_s: float) -> Storage:
    return Storage(url, retries=retries, backoff_s=backoff_s, **options)


def _copy_into(local_path: str | os.PathLike, dst: BinaryIO) -> None:
    with open(local_path, "rb") as src:
        shutil.copyfileobj(src, dst, 1 << 20)

"""One filesystem per cache: the fsspec filesystem of its URL with its storage options, used by every reader.

`CacheFS` is what a `Cache`, its store reader, `verify` and the loader's workers share: it pickles as (url,
storage_options), so a DataLoader worker reopens exactly the filesystem the user configured (credentials, endpoint),
never a default one. Reads are bounded (a file larger than the manifest says is refused before it is read whole).

On a local disk, every file read must be a regular file inside the cache root: a symlink out of the cache, a FIFO
or a device is refused, never opened.

Remote caches (https://, s3://, anything fsspec opens) get three things fsspec does not do by itself:
- transient faults (HTTP 5xx, 408/429, resets, timeouts, truncated bodies) are retried with exponential back-off
  and jitter; a fault that persists is one error naming the file and what went wrong, never a shorter epoch;
- a server that ignores HTTP Range requests is named as such (random access needs them), not reported as damage;
- with `cache_dir`, whole files are downloaded once into a local read-through cache (`mirror.py`), each verified
  against the manifest's size and sha256 before it is used, and evicted least-recently-used beyond a size bound.

Keys of `storage_options` that attncache itself reads (the rest go to fsspec): `retries` (default 5), `backoff`
(first delay in seconds, default 0.5), `cache_dir` (or the environment variable ATTNCACHE_CACHE_DIR) and
`cache_max_bytes` (default 50 GB).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import stat
import time
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..errors import AttncacheError, CacheFormatError

OWN_OPTIONS = ("retries", "backoff", "cache_dir", "cache_max_bytes")
DEFAULT_RETRIES = 5
DEFAULT_BACKOFF_S = 0.5
DEFAULT_CACHE_MAX_BYTES = 50 * 10**9
NO_RANGES = ("the server does not support HTTP range requests, which reading a cache needs (copy it instead: "
             "attncache copy)")
EXTRAS = {"s3": "s3", "s3a": "s3"}  # scheme -> pip extra that installs it (HTTPS is in the default install)


class ShortRead(OSError):
    """A remote read returned fewer bytes than asked: a truncated response, retried like a reset."""


class NoRangeSupport(AttncacheError):
    pass


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def describe(exc: BaseException) -> str:
    """A network or filesystem fault in a few words: what it is, not the library's type hierarchy."""
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return f"HTTP {status} {getattr(exc, 'message', '') or ''}".strip()
    name = type(exc).__name__
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) or "Timeout" in name:
        return "timed out"
    if "Connector" in name or isinstance(exc, ConnectionRefusedError):
        return f"cannot connect ({_one_line(exc)})"
    if isinstance(exc, ShortRead):
        return str(exc)
    if "support range requests" in str(exc):  # fsspec's HTTPFile, reading past a server that ignores Range
        return NO_RANGES
    return f"{name}: {_one_line(exc)}"


def is_transient(exc: BaseException) -> bool:
    """Worth another try: server errors, throttling, resets, timeouts, truncated bodies. Not: a missing file, a
    refused permission, a 4xx, bad options, a damaged cache."""
    if isinstance(exc, (AttncacheError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return status >= 500 or status in (408, 429)
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError, ConnectionError, OSError)):
        return True
    module = type(exc).__module__ or ""
    # aiohttp's client errors (payload cut short, server disconnected, ...), fsspec's and botocore's timeouts
    return module.startswith(("aiohttp", "botocore", "urllib3", "requests")) or "Timeout" in type(exc).__name__


class CacheFS:
    def __init__(self, url: str | Path, storage_options: dict | None = None):
        self.url = str(url).rstrip("/") or "/"
        self.storage_options = dict(storage_options or {})
        fs_options = {k: v for k, v in self.storage_options.items() if k not in OWN_OPTIONS}
        own = {k: self.storage_options[k] for k in OWN_OPTIONS if k in self.storage_options}
        try:
            self.retries = int(own.get("retries", DEFAULT_RETRIES))
            self.backoff = float(own.get("backoff", DEFAULT_BACKOFF_S))
            cache_max_bytes = int(own.get("cache_max_bytes", DEFAULT_CACHE_MAX_BYTES))
        except (TypeError, ValueError) as exc:
            raise AttncacheError(f"`storage_option`: {exc}") from exc
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **fs_options)
        except ImportError as exc:
            scheme = self.url.split("://", 1)[0]
            extra = EXTRAS.get(scheme)
            hint = f"pip install 'attncache[{extra}]'" if extra else "install the fsspec backend it names"
            raise AttncacheError(f"{self.url}: {scheme}:// needs a package that is not installed ({hint}; "
                                 f"{_one_line(exc)})") from exc
        except Exception as exc:  # noqa: BLE001 - an unknown scheme, options it cannot use
            raise AttncacheError(f"{self.url}: cannot open ({type(exc).__name__}: {_one_line(exc)})") from exc
        self.root = self.root.rstrip("/") or "/"
        self.local = type(self.fs) is LocalFileSystem  # a subclass or wrapper may add rules: go through fsspec
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.http = not self.local and "http" in protocols
        # backends whose open() takes the size the manifest states, so that a whole-file GET needs no HEAD first
        self.sized_open = self.http or bool({"s3", "s3a"} & set(protocols))
        self.known: dict[str, dict] = {}  # rel -> {path, bytes, sha256} from a validated manifest (Cache sets it)
        self.mirror = None
        self.mirror_only: set[str] | None = None  # with the default mirror: the files read through it
        cache_dir = own.get("cache_dir") or os.environ.get("ATTNCACHE_CACHE_DIR")
        if cache_dir and not self.local:
            from .mirror import Mirror

            self.mirror = Mirror(cache_dir, self.url, cache_max_bytes)

    def __reduce__(self):
        return _reopen, (self.url, self.storage_options, self.known)

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def where(self, rel: str) -> str:
        """How errors name a file: the cache URL and the relative path."""
        return f"{self.url}/{rel}"

    # -- reading ----------------------------------------------------------------------------------------------

    def read(self, rel: str, limit: int) -> bytes:
        """The whole file, refusing one larger than `limit` bytes."""
        def whole():
            if self.http and not self._mirrored(rel):  # a streamed GET, no HEAD (fsspec: failed HEAD = not found)
                with self.fs.open(self.path(rel), "rb", block_size=0, size=limit + 1) as f:
                    parts, n = [], 0
                    while n <= limit and (part := f.read(limit + 1 - n)):  # a stream read returns what has come
                        parts.append(part)
                        n += len(part)
                    declared = f.r.headers.get("Content-Length")
                if declared is not None and n <= limit and int(declared) != n:
                    raise ShortRead(f"response truncated ({n} of {declared} bytes)")
                return b"".join(parts)
            with self.open(rel) as f:
                return f.read(limit + 1)

        data = whole() if self.local or self._mirrored(rel) else self.call(rel, whole)
        if len(data) > limit:
            raise CacheFormatError(f"{self.where(rel)}: larger than {limit} bytes")
        return data

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a file; fewer bytes than asked is an error naming the file."""
        if self.local or self._mirrored(rel):
            fd = self._open_local(rel) if self.local else os.open(self.mirror.fetch(self, rel), os.O_RDONLY)
            try:
                data = os.pread(fd, end - start, start)
            finally:
                os.close(fd)
        else:
            data = self.call(rel, lambda: self._remote_range(rel, start, end))
        if len(data) != end - start:
            raise CacheFormatError(f"{self.where(rel)}: truncated (wanted bytes {start}..{end})")
        return data

    def _remote_range(self, rel: str, start: int, end: int) -> bytes:
        path = self.path(rel)
        if self.http:
            # HTTPFile checks that the server honoured the Range header (fsspec's cat_file would take a whole
            # file for the range); with the size from the manifest it needs no HEAD request first.
            size = self.known.get(rel, {}).get("bytes")
            try:
                with self.fs.open(path, "rb", block_size=max(1, end - start), cache_type="none", size=size) as f:
                    f.seek(start)
                    data = f.read(end - start)
            except ValueError as exc:
                if "range requests" in str(exc):
                    raise NoRangeSupport(f"{self.where(rel)}: {NO_RANGES}") from exc
                raise
        else:
            data = self.fs.cat_file(path, start=start, end=end)
        known = self.known.get(rel)
        if len(data) != end - start and (known is None or end <= known["bytes"]):
            raise ShortRead(f"response truncated ({len(data)} of {end - start} bytes)")
        return data

    def open_fd(self, rel: str) -> int:
        """A descriptor to read `rel` with `os.pread`: the file itself on a local disk, else its node-local copy
        (downloaded once per node and checked against the manifest's size and sha256: mirror.py), kept in
        `cache_dir`, or without one in the default node-local directory (`node_mirror_dir`)."""
        if self.local:
            return self._open_local(rel)
        if self.mirror is None:
            from .mirror import Mirror

            self.mirror = Mirror(node_mirror_dir(), self.url, DEFAULT_CACHE_MAX_BYTES)
            self.mirror_only = set()  # the default mirror takes what asks for it (tables), not the shards
        if self.mirror_only is not None:
            self.mirror_only.add(rel)
        return os.open(self.mirror.fetch(self, rel), os.O_RDONLY)

    def open(self, rel: str):
        """A binary file object for reading (a regular file inside the root, on a local disk). Remote: not retried
        by itself; wrap the whole use in `call`."""
        if self.local:
            return os.fdopen(self._open_local(rel), "rb")
        if self._mirrored(rel):
            return open(self.mirror.fetch(self, rel), "rb")
        return self.open_remote(rel)

    def open_remote(self, rel: str, **options):
        """The remote file object of `rel`, its size taken from the manifest where the backend allows it, so a
        read makes no HEAD request first: fsspec's HTTPFile asks for the size, s3fs's file for its details (an
        ETag it compares on each range; the manifest's sha256 is our check)."""
        size = self.known.get(rel, {}).get("bytes") if self.sized_open else None
        f = self.fs.open(self.path(rel), "rb", **options, **({"size": size} if size is not None else {}))
        if size is not None and getattr(f, "_details", False) is None:
            f.details = {"name": self.path(rel), "size": size, "type": "file"}
        return f

    def size(self, rel: str) -> int:
        if self.local:
            fd = self._open_local(rel)
            try:
                return os.fstat(fd).st_size
            finally:
                os.close(fd)
        return int(self.call(rel, lambda: self.fs.size(self.path(rel))))

    def exists(self, rel: str) -> bool:
        with self.guard(rel):
            return self.fs.exists(self.path(rel))

    def sha256(self, rel: str, limit: int) -> tuple[int, str]:
        """(size, sha256) of a file, reading at most `limit` + 1 bytes."""
        def digest():
            h, n = hashlib.sha256(), 0
            with self.open(rel) as f:
                while block := f.read(min(1 << 22, limit + 1 - n)):
                    h.update(block)
                    n += len(block)
                    if n > limit:
                        break
            return n, h.hexdigest()

        return digest() if self.local or self._mirrored(rel) else self.call(rel, digest)  # a download retries itself

    def files(self) -> list[str]:
        """Every file below the root, as relative paths (what `verify` compares with the manifest)."""
        found = self.call("", lambda: self.fs.find(self.root, withdirs=False))
        prefix = self.root.rstrip("/") + "/"
        return sorted(p[len(prefix):] if p.startswith(prefix) else p for p in found)

    # -- writing (attncache copy, extract --out URL) --------------------------------------------------------------

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Store `data` as `rel`, visible whole or not at all: a local file is renamed into place; an object
        store's put is atomic per object."""
        if self.local:
            from ..files import atomic_write_bytes

            atomic_write_bytes(self.path(rel), data)
        else:
            self.call(rel, lambda: self.fs.pipe_file(self.path(rel), data))

    def put(self, rel: str, local: str | Path) -> None:
        """Upload (or copy) a local file as `rel`, streamed (an object store's multipart upload becomes visible
        only once complete)."""
        if self.local:
            import shutil
            import tempfile

            from ..files import PARTIAL_SUFFIX, file_mode

            target = Path(self.path(rel))
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX)
            os.close(fd)
            try:
                shutil.copyfile(local, tmp)
                os.chmod(tmp, file_mode())
                os.replace(tmp, target)
            finally:
                Path(tmp).unlink(missing_ok=True)
        else:
            self.call(rel, lambda: self.fs.put_file(str(local), self.path(rel)))

    def remove(self, rel: str) -> None:
        """Delete `rel` (a file, or a folder and all below it) if it is there."""
        def rm():
            if self.fs.exists(self.path(rel)):
                self.fs.rm(self.path(rel), recursive=True)

        self.call(rel, rm)

    def _mirrored(self, rel: str) -> bool:
        return self.mirror is not None and rel in self.known and (self.mirror_only is None or rel in self.mirror_only)

    # -- errors and retries -----------------------------------------------------------------------------------

    def call(self, rel: str, fn):
        """fn() with transient faults retried (exponential back-off with jitter); any error as one line naming
        the file. Locally there is nothing to retry."""
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                with self.guard(rel, attempt if attempt else None, retrying=not self.local):
                    return fn()
            except _Retry:
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def guard(self, rel: str, attempt: int | None = None, retrying: bool = False):
        """Errors while opening or reading `rel` as one line naming the file (a missing file, a refused
        connection, bad options: each filesystem raises its own types, some only on the first read)."""
        try:
            yield
        except AttncacheError:
            raise
        except Exception as exc:  # noqa: BLE001 - each filesystem raises its own types
            if isinstance(exc, FileNotFoundError):
                # fsspec's HTTP filesystem reports any failed HEAD (a 503 too) as not found: look at the cause
                if not (retrying and exc.__cause__ is not None and is_transient(exc.__cause__)):
                    raise CacheFormatError(f"{self.where(rel)}: missing") from exc
                exc = exc.__cause__
            if retrying and is_transient(exc) and (attempt or 0) < self.retries:
                raise _Retry() from exc
            tries = f" after {(attempt or 0) + 1} attempts" if retrying and is_transient(exc) else ""
            raise AttncacheError(f"{self.where(rel)}: cannot read{tries} ({describe(exc)})") from exc

    def _open_local(self, rel: str) -> int:
        path = self.path(rel)
        real_root = os.path.realpath(self.root)
        if os.path.commonpath([os.path.realpath(path), real_root]) != real_root:
            raise CacheFormatError(f"{self.where(rel)}: leads outside the cache (a symlink?)")
        try:
            # O_NOFOLLOW: no symlink as the last component; O_NONBLOCK: opening a FIFO must not hang
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError as exc:
            raise CacheFormatError(f"{self.where(rel)}: missing") from exc
        except OSError as exc:
            raise CacheFormatError(f"{self.where(rel)}: cannot open ({exc.strerror})") from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CacheFormatError(f"{self.where(rel)}: not a regular file")
        os.set_blocking(fd, True)
        return fd


def node_mirror_dir() -> Path:
    """Where a remote cache's tables are kept on this node when no `cache_dir` is given: $ATTNCACHE_MIRROR_DIR,
    else a folder of this user's in the temporary directory (node-local, shared by its ranks and workers)."""
    import tempfile

    return Path(os.environ.get("ATTNCACHE_MIRROR_DIR") or Path(tempfile.gettempdir()) / f"attncache-{os.getuid()}")


def is_url(path: str | Path) -> bool:
    """A remote location (s3://, https://, ...) rather than a local path (or file://)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


class _Retry(Exception):
    pass


def _reopen(url: str, storage_options: dict, known: dict) -> CacheFS:
    fs = CacheFS(url, storage_options)
    fs.known = known
    return fs

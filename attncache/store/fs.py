"""One filesystem per cache: the fsspec filesystem of its URL with its storage options, used by every reader.

`CacheFS` is what a `Cache`, its store reader, `verify` and the loader's workers share: it pickles as (url,
storage_options), so a DataLoader worker reopens exactly the filesystem the user configured (credentials, endpoint),
never a default one. Reads are bounded (a file larger than the manifest says is refused before it is read whole).
On a local disk, every file read must be a regular file inside the cache root: a symlink out of the cache, a FIFO
or a device is refused, never opened.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..errors import AttncacheError, CacheFormatError


class CacheFS:
    def __init__(self, url: str | Path, storage_options: dict | None = None):
        self.url = str(url).rstrip("/") or "/"
        self.storage_options = dict(storage_options or {})
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        except Exception as exc:  # noqa: BLE001 - an unknown scheme, a missing package, options it cannot use
            detail = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise AttncacheError(f"{self.url}: cannot open ({type(exc).__name__}: {detail})") from exc
        self.root = self.root.rstrip("/") or "/"
        self.local = type(self.fs) is LocalFileSystem  # a subclass or wrapper may add rules: go through fsspec

    def __reduce__(self):
        return CacheFS, (self.url, self.storage_options)

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def where(self, rel: str) -> str:
        """How errors name a file: the cache URL and the relative path."""
        return f"{self.url}/{rel}"

    # -- reading ----------------------------------------------------------------------------------------------

    def read(self, rel: str, limit: int) -> bytes:
        """The whole file, refusing one larger than `limit` bytes."""
        with self.guard(rel), self.open(rel) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise CacheFormatError(f"{self.where(rel)}: larger than {limit} bytes")
        return data

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a file; fewer bytes than asked is an error naming the file."""
        if self.local:
            fd = self._open_local(rel)
            try:
                data = os.pread(fd, end - start, start)
            finally:
                os.close(fd)
        else:
            with self.guard(rel):
                data = self.fs.cat_file(self.path(rel), start=start, end=end)
        if len(data) != end - start:
            raise CacheFormatError(f"{self.where(rel)}: truncated (wanted bytes {start}..{end})")
        return data

    def open(self, rel: str):
        """A binary file object for reading (a regular file inside the root, on a local disk)."""
        if self.local:
            return os.fdopen(self._open_local(rel), "rb")
        with self.guard(rel):
            return self.fs.open(self.path(rel), "rb")

    def size(self, rel: str) -> int:
        if self.local:
            fd = self._open_local(rel)
            try:
                return os.fstat(fd).st_size
            finally:
                os.close(fd)
        with self.guard(rel):
            return int(self.fs.size(self.path(rel)))

    def exists(self, rel: str) -> bool:
        with self.guard(rel):
            return self.fs.exists(self.path(rel))

    def sha256(self, rel: str, limit: int) -> tuple[int, str]:
        """(size, sha256) of a file, reading at most `limit` + 1 bytes."""
        h, n = hashlib.sha256(), 0
        with self.guard(rel), self.open(rel) as f:
            while block := f.read(min(1 << 22, limit + 1 - n)):
                h.update(block)
                n += len(block)
                if n > limit:
                    break
        return n, h.hexdigest()

    def files(self) -> list[str]:
        """Every file below the root, as relative paths (what `verify` compares with the manifest)."""
        with self.guard(""):
            found = self.fs.find(self.root, withdirs=False)
        prefix = self.root.rstrip("/") + "/"
        return sorted(p[len(prefix):] if p.startswith(prefix) else p for p in found)

    @contextlib.contextmanager
    def guard(self, rel: str):
        """Errors while opening or reading `rel` as one line naming the file (a missing file, a refused
        connection, bad options: each filesystem raises its own types, some only on the first read)."""
        try:
            yield
        except FileNotFoundError as exc:
            raise CacheFormatError(f"{self.where(rel)}: missing") from exc
        except AttncacheError:
            raise
        except Exception as exc:  # noqa: BLE001 - each filesystem raises its own types
            detail = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise AttncacheError(f"{self.where(rel)}: cannot read ({type(exc).__name__}: {detail})") from exc

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

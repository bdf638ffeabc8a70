"""A local read-through cache of a remote cache's files (`--cache-dir`): each file the manifest names is downloaded
whole on first use, checked against the manifest's size and sha256, then read from the local disk.

Why not fsspec's `filecache::`: it neither bounds its size nor verifies what it downloaded. Here a file is used only
once its bytes are the ones the manifest names (so a flaky network or a changed server file is caught before a
single map is decoded), and the directory stays under `max_bytes` by evicting the least recently used files.

Layout: `<cache_dir>/<sha256(url)[:16]>/<the file's sha256[:24]>/<relative path>`: content-addressed, so a copy
left by an earlier cache at the same URL is never taken for this one's; a `.lock` file serialises downloads and
eviction among the processes that share the directory (DataLoader workers, DDP ranks). Files are published by
rename.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from ..errors import AttncacheError, CacheFormatError
from ..files import PARTIAL_SUFFIX, FileLock, stream_verified

BLOCK = 8 << 20


class Mirror:
    def __init__(self, cache_dir: str | os.PathLike, url: str, max_bytes: int):
        self.dir = Path(cache_dir).expanduser() / hashlib.sha256(url.encode()).hexdigest()[:16]
        self.max_bytes = max_bytes
        self.used: set[str] = set()  # files this process has touched (their mtime marks recent use)

    def fetch(self, fs, rel: str) -> str:
        """The local path of `rel`, downloading and verifying it first if it is not here yet."""
        entry = fs.known[rel]
        local = self.dir / entry["sha256"][:24] / rel
        if os.path.commonpath([os.path.realpath(local), os.path.realpath(self.dir)]) != os.path.realpath(self.dir):
            raise CacheFormatError(f"{fs.where(rel)}: leads outside the cache")
        if not self._ready(local, entry):
            with self._locked():
                if not self._ready(local, entry):  # another process may have fetched it meanwhile
                    if entry["bytes"] > self.max_bytes:
                        raise AttncacheError(f"{fs.where(rel)}: {entry['bytes']:,} bytes do not fit in `cache_dir` "
                                             f"(cache_max_bytes {self.max_bytes:,})")
                    self._evict(entry["bytes"])
                    fs.call(rel, lambda: self._download(fs, rel, entry, local))
        if rel not in self.used:
            os.utime(local)
            self.used.add(rel)
        return str(local)

    @staticmethod
    def _ready(local: Path, entry: dict) -> bool:
        return local.is_file() and not local.is_symlink() and local.stat().st_size == entry["bytes"]

    def _download(self, fs, rel: str, entry: dict, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=local.parent, prefix=f".{local.name}.", suffix=PARTIAL_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as out, fs.open_remote(rel, block_size=BLOCK) as src:  # no HEAD first
                stream_verified(src, out, entry, fs.where(rel), BLOCK, remote=True)
            os.replace(tmp, local)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _evict(self, incoming: int) -> None:
        """Remove least recently used files until `incoming` more bytes fit under the bound."""
        files = [(p.stat().st_mtime_ns, p.stat().st_size, p) for p in self.dir.rglob("*")
                 if p.is_file() and not p.name.startswith(".")]
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total + incoming <= self.max_bytes:
                break
            path.unlink(missing_ok=True)  # a reader that has it open keeps reading it (POSIX)
            total -= size

    def _locked(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        return FileLock(self.dir / ".lock")


"""`attncache copy SRC DST`: copy a finished cache between a local directory, an HTTPS server (source only) and an
object store, verifying every file against the source manifest's size and sha256 before it is written.

Resumable: a file already at DST with the right size and sha256 is kept (it is read back and hashed, so a damaged
or half-written one from a killed copy is replaced); the manifest is written last, so DST is a cache only once
every file it names is there and checked. Memory: one block (4 MiB) at a time; local disk: one file (each is
streamed into a temporary file, checked, then written or uploaded). No codec is built: the manifest's entries are
all it needs, side files included, so a cache of a codec this attncache does not know copies too.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from ..cache import CacheFiles
from ..errors import AttncacheError
from ..files import stream_verified
from ..store.format import MANIFEST, MAX_MANIFEST_BYTES, named_files
from ..store.fs import CacheFS

BLOCK = 4 << 20


def copy_cache(src: str, dst: str, src_options: dict | None = None, dst_options: dict | None = None,
               manifest_sha256: str | None = None, on_file: Callable[[str, bool], None] | None = None) -> dict:
    """Returns {"files", "copied", "kept", "bytes"}; `on_file(path, copied)` is called after each file."""
    cache = CacheFiles(src, src_options, manifest_sha256=manifest_sha256)
    target = CacheFS(dst, dst_options)
    if target.http:
        raise AttncacheError(f"{dst}: an HTTP(S) server is read-only here; copy to a local directory or s3://")
    manifest_bytes = cache.manifest_bytes  # the bytes the pin was checked on (a second read could differ)
    if _exists(target, MANIFEST):
        if target.read(MANIFEST, MAX_MANIFEST_BYTES) == manifest_bytes:
            pass  # a finished copy of this cache (or a resumed one): each file is still checked below
        else:
            raise AttncacheError(f"{dst}: already holds another cache (its manifest differs); choose another "
                                 "destination")
    copied = kept = 0
    entries = named_files(cache.manifest)
    for f in entries:
        present = _intact(target, f)
        if present:
            kept += 1
        else:
            with tempfile.TemporaryDirectory(prefix="attncache-copy-") as staging:
                local = Path(staging) / "file"
                cache.fs.call(f["path"], lambda f=f, local=local: _download_verified(cache.fs, f, local))
                target.put(f["path"], local)  # streamed; an object store shows it only once whole
            copied += 1
        if on_file is not None:
            on_file(f["path"], not present)
    target.write_bytes(MANIFEST, manifest_bytes)  # last
    return {"files": len(entries) + 1, "copied": copied, "kept": kept,
            "bytes": sum(f["bytes"] for f in entries) + len(manifest_bytes),
            "manifest_sha256": cache.manifest_sha256}


def _download_verified(fs: CacheFS, entry: dict, local: Path) -> None:
    """Stream `entry` into `local` a block at a time (a 1 GB table never sits in memory), checked against the
    manifest: a damaged source file is never written to the destination."""
    with fs.open(entry["path"]) as src, open(local, "wb") as out:
        stream_verified(src, out, entry, fs.where(entry["path"]), BLOCK, remote=not fs.local)


def _exists(fs: CacheFS, rel: str) -> bool:
    try:
        return fs.exists(rel)
    except AttncacheError:
        return False


def _intact(fs: CacheFS, entry: dict) -> bool:
    """Is the file at the destination already this entry's bytes?"""
    try:
        if not _exists(fs, entry["path"]) or fs.size(entry["path"]) != entry["bytes"]:
            return False
        size, digest = fs.sha256(entry["path"], entry["bytes"])
    except AttncacheError:
        return False
    return size == entry["bytes"] and digest == entry["sha256"]

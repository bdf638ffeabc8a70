"""Integrity check of a cache: every file the manifest names has its recorded size and sha256, and decodes."""

from __future__ import annotations

import hashlib

import fsspec

from .cache import open_cache
from .errors import CacheFormatError


def _hash_remote(url: str, storage_options: dict) -> tuple[int, str]:
    h, n = hashlib.sha256(), 0
    with fsspec.open(url, "rb", **storage_options) as f:
        while block := f.read(1 << 22):
            h.update(block)
            n += len(block)
    return n, h.hexdigest()


def verify_cache(root: str, storage_options: dict | None = None, decode: bool = True) -> dict:
    """Raises CacheFormatError naming the first bad file; returns counts when all is well."""
    cache = open_cache(root, storage_options)
    m = cache.manifest
    entries = [f for s in m["store"]["shards"] for f in s["files"]]
    entries += m["store"].get("metadata_files", []) + list(m["files"].values())
    for f in entries:
        try:
            size, digest = _hash_remote(f"{cache.root}/{f['path']}", cache.storage_options)
        except OSError as exc:
            raise CacheFormatError(f"{cache.root}/{f['path']}: missing or unreadable ({exc})") from exc
        if size != f["bytes"] or digest != f["sha256"]:
            raise CacheFormatError(f"{cache.root}/{f['path']}: size/sha256 mismatch with the manifest "
                                   f"({size} bytes, expected {f['bytes']})")
    if decode:
        for shard in m["store"]["shards"]:  # first record of every shard decodes to valid maps
            maps = cache.read_rows([shard["first_record"]])
            if not maps.isfinite().all():
                raise CacheFormatError(f"{cache.root}: shard {shard['index']} decodes to non-finite maps")
        _ = cache.samples, cache.views
    return {"files": len(entries), "records": len(cache), "bytes": sum(f["bytes"] for f in entries)}

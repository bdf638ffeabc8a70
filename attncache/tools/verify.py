"""`attncache verify`: every file the manifest names has its recorded size and sha256, nothing else is there,
and the first record of every shard decodes to finite maps."""

from __future__ import annotations

from ..cache import open_cache
from ..errors import CacheFormatError
from ..store.format import MANIFEST, named_files


def verify_cache(root: str, storage_options: dict | None = None, decode: bool = True) -> dict:
    """Raises CacheFormatError naming the first bad file; returns counts when all is well."""
    cache = open_cache(root, storage_options)
    m, fs = cache.manifest, cache.fs
    entries = named_files(m)
    for f in entries:
        size, digest = fs.sha256(f["path"], f["bytes"])
        if size != f["bytes"] or digest != f["sha256"]:
            raise CacheFormatError(f"{fs.where(f['path'])}: size/sha256 mismatch with the manifest "
                                   f"({size} bytes, expected {f['bytes']})")
    extra = sorted(set(fs.files()) - {f["path"] for f in entries} - {MANIFEST})
    if extra:  # a leftover temporary file, or something added later: a finished cache holds what it names
        raise CacheFormatError(f"{fs.where(extra[0])}: not part of the cache (the manifest does not name it"
                               f"{f'; {len(extra) - 1} more' if len(extra) > 1 else ''})")
    if decode:
        for shard in m["store"]["shards"]:  # first record of every shard decodes to valid maps
            maps = cache.read_rows([shard["first_record"]])
            if not maps.isfinite().all():
                raise CacheFormatError(f"{cache.root}: shard {shard['index']} decodes to non-finite maps")
        _ = cache.samples, cache.views
    return {"files": len(entries), "records": len(cache), "bytes": sum(f["bytes"] for f in entries)}

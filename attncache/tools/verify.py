"""`attncache verify`: is every byte of a cache the one its manifest names?

- quick: every file the manifest names has its size; every sample and view is read (each table block's crc32c;
  versions 1-4: the JSONL files against their sha256) and checked; the store metadata matches its sha256; every
  stored chunk's crc32c holds (format version 4 on). Reads every byte once, hashes none of the big files.
- full (default): the sha256 of every file, no file the manifest does not name, every chunk's crc32c, and the
  first record of every shard decodes to finite maps.
Either way the first problem is a CacheFormatError naming the file (and the record, for a chunk). Only the decoding
builds the cache's codec: the files, side files included, are checked by their manifest entries alone.
"""

from __future__ import annotations

from ..cache import Cache, CacheFiles
from ..errors import CacheFormatError
from ..store.format import MANIFEST, has_chunk_checksums, named_files


def verify_cache(root: str, storage_options: dict | None = None, decode: bool = True, quick: bool = False,
                 manifest_sha256: str | None = None) -> dict:
    """Raises CacheFormatError naming the first bad file; returns counts when all is well."""
    cache = CacheFiles(root, storage_options, manifest_sha256=manifest_sha256)
    m, fs = cache.manifest, cache.fs
    entries = named_files(m)
    for f in entries:
        if quick:
            size = fs.size(f["path"])
            if size != f["bytes"]:
                raise CacheFormatError(f"{fs.where(f['path'])}: {size} bytes, the manifest says {f['bytes']}")
        else:
            size, digest = fs.sha256(f["path"], f["bytes"])
            if size != f["bytes"] or digest != f["sha256"]:
                raise CacheFormatError(f"{fs.where(f['path'])}: size/sha256 mismatch with the manifest "
                                       f"({size} bytes, expected {f['bytes']})")
    cache.check_records()  # every sample and view read (each block's checksum) and checked, both modes
    chunks = 0
    if has_chunk_checksums(m):
        for where, data in cache.reader.chunks():
            cache.reader.check_chunk(data, where)
            chunks += 1
    if not quick:
        if fs.local or not fs.http:  # an HTTP server need not list its files
            extra = sorted(set(fs.files()) - {f["path"] for f in entries} - {MANIFEST})
            if extra:  # a leftover temporary file, or something added later: a finished cache holds what it names
                raise CacheFormatError(f"{fs.where(extra[0])}: not part of the cache (the manifest does not name "
                                       f"it{f'; {len(extra) - 1} more' if len(extra) > 1 else ''})")
        if decode:
            _check_first_records_decode(cache)
    return {"files": len(entries), "records": len(cache), "chunks_checked": chunks,
            "bytes": sum(f["bytes"] for f in entries), "manifest_sha256": cache.manifest_sha256,
            "mode": "quick" if quick else "full"}


def _check_first_records_decode(files: CacheFiles) -> None:
    """The first record of every shard decodes to finite maps, read as training reads them: the manifest checked
    against its codec too, which is built and bound here."""
    cache = Cache(files.root, files.storage_options, files.manifest_sha256, files.manifest_bytes)
    for shard in cache.manifest["store"]["shards"]:
        if not cache.read_rows([shard["first_record"]]).isfinite().all():
            raise CacheFormatError(f"{cache.root}: shard {shard['index']} decodes to non-finite maps")

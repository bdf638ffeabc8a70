"""Zarr v3 store: one sharded array per codec field, record axis first; chunk = 1 record, shard = N records.

Writing goes through zarr itself. Each extraction shard is exactly one zarr shard, written by one process in one
call, so two writers never touch the same shard file (zarr's read-modify-write of a shared shard loses data).

Reading does not trust the zarr metadata to say how to decode: the cache's zarr.json files must be byte-for-byte
what this writer makes for the manifest (same codecs, same grid, nothing inserted), and the reader then decodes the
shards by the manifest alone: it reads a shard's index (its crc32c checked), then the byte range of each run of
records, checks each chunk's crc32c and decompresses it with the manifest's compressor, bounded. A chunk missing
from a shard is an error, never a fill value. Any Zarr v3 implementation reads the same cache the same way
(docs/format.md).
"""

from __future__ import annotations

import functools
import hashlib
import json

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from ..errors import CacheFormatError
from ..files import StrictJSONError, loads_strict
from .base import StoreReader, StoreWriter
from .format import has_chunk_checksums

_SHUFFLE_NAMES = {0: "noshuffle", 1: "shuffle", 2: "bitshuffle"}
_EMPTY = 2**64 - 1  # zarr's marker of a chunk absent from its shard
MAX_METADATA_BYTES = 1 << 20


def _compressors(config: dict | None, checksum: bool) -> list:
    """The chunk's bytes-to-bytes codecs: the manifest's compressor, then zarr's crc32c (format version 4 on)."""
    codecs = [] if config is None else [
        BloscCodec(cname=config["cname"], clevel=config["clevel"], shuffle=_SHUFFLE_NAMES[config["shuffle"]],
                   typesize=config["typesize"], blocksize=config["blocksize"])]
    return codecs + ([Crc32cCodec()] if checksum else [])


def _create_arrays(store, fields: dict, compressor: dict | None, records: int, per_shard: int, checksum: bool,
                   overwrite: bool = False) -> dict:
    """The group and its arrays, as this format defines them (the writer's and the reader's one definition)."""
    group = zarr.open_group(store, mode="a", zarr_format=3)
    arrays = {}
    for name, spec in fields.items():
        shape = tuple(spec["shape"])
        if name in group and not overwrite:
            arrays[name] = group[name]
            continue
        arrays[name] = group.create_array(
            name, shape=(records, *shape), dtype=spec["dtype"], chunks=(1, *shape), shards=(per_shard, *shape),
            compressors=_compressors(compressor, checksum), fill_value=0, overwrite=overwrite,
            dimension_names=("record", *[f"d{i}" for i in range(len(shape))]),
            config={"write_empty_chunks": True},  # a record equal to the fill value is still stored
        )
    return arrays


@functools.lru_cache(maxsize=32)
def _expected_metadata_json(fields_json: str, compressor_json: str, records: int, per_shard: int,
                            checksum: bool) -> dict:
    store = zarr.storage.MemoryStore()
    fields = json.loads(fields_json)
    _create_arrays(store, fields, json.loads(compressor_json), records, per_shard, checksum)
    names = ["zarr.json"] + [f"{name}/zarr.json" for name in fields]
    return {name: json.loads(store._store_dict[name].to_bytes()) for name in names}


def expected_metadata(manifest: dict) -> dict[str, dict]:
    """{relative path: parsed zarr.json} exactly as the writer creates them for this manifest."""
    s, c = manifest["store"], manifest["codec"]
    return _expected_metadata_json(json.dumps(c["fields"], sort_keys=True), json.dumps(c["compressor"]),
                                   s["records"], s["records_per_shard"], has_chunk_checksums(manifest))


class ZarrWriter(StoreWriter):
    format = "zarr"

    def __init__(self, *args, overwrite: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if self.embed_images:
            raise ValueError("--embed-images needs --format wds (a zarr cache joins images by key)")
        store = zarr.storage.LocalStore(self.root)
        self.arrays = _create_arrays(store, {k: v.to_json() for k, v in self.fields.items()}, self.compressor,
                                     self.records, self.records_per_shard, self.checksum, overwrite=overwrite)

    def write_shard(self, index, arrays, records, images=None):
        # zarr reads an existing shard before writing into it (read-modify-write); a stale or damaged shard from
        # an earlier run must not take part: the shard is rewritten whole.
        for path in self.shard_paths(index):
            (self.root / path).unlink(missing_ok=True)
        first = index * self.records_per_shard
        for name, array in self.arrays.items():
            array[first:first + len(records)] = arrays[name]


class ZarrReader(StoreReader):
    def __init__(self, fs, manifest):
        super().__init__(fs, manifest)
        self._check_metadata()
        self._indexes: dict[tuple[str, int], tuple[str, np.ndarray, int]] = {}

    def _check_metadata(self) -> None:
        expected = expected_metadata(self.manifest)
        entries = {f["path"]: f for f in self.manifest["store"]["metadata_files"]}
        for rel, meta in expected.items():
            data = self.fs.read(rel, MAX_METADATA_BYTES)
            if hashlib.sha256(data).hexdigest() != entries[rel]["sha256"]:
                raise CacheFormatError(f"{self.fs.where(rel)}: does not match the sha256 in the manifest")
            try:
                stored = loads_strict(data)
            except StrictJSONError as exc:
                raise CacheFormatError(f"{self.fs.where(rel)}: {exc}") from exc
            if stored != meta:
                differ = sorted(k for k in set(stored) | set(meta) if stored.get(k) != meta.get(k)) \
                    if isinstance(stored, dict) else ["(not an object)"]
                raise CacheFormatError(f"{self.fs.where(rel)}: zarr metadata differs from what the manifest implies "
                                       f"({', '.join(differ)})")

    def _shard_index(self, name: str, shard: int) -> tuple[str, np.ndarray, int]:
        """(relative path, (records_per_shard, 2) offsets and lengths, where the index starts) of a field's shard;
        the index's crc32c is checked."""
        (rel,) = [p for p in self.shard_files[shard] if p.startswith(f"{name}/")]
        key = (name, shard)
        if key not in self._indexes:
            size = self.shard_files[shard][rel]["bytes"]
            nbytes = self.records_per_shard * 16
            if size < nbytes + 4:
                raise CacheFormatError(f"{self.fs.where(rel)}: shorter than its shard index")
            data = self.fs.read_range(rel, size - nbytes - 4, size)
            if google_crc32c.value(data[:-4]).to_bytes(4, "little") != data[-4:]:
                raise CacheFormatError(f"{self.fs.where(rel)}: shard index checksum mismatch (damaged shard)")
            index = np.frombuffer(data[:-4], dtype="<u8").reshape(self.records_per_shard, 2)
            self._indexes[key] = (rel, index, size - nbytes - 4)
        return self._indexes[key]

    def stored(self, name: str, row: int) -> bytes:
        """One record's field exactly as stored (its compressed chunk): for tools that time or inspect it."""
        rel, index, _ = self._shard_index(name, row // self.records_per_shard)
        offset, length = (int(v) for v in index[row % self.records_per_shard])
        return self.fs.read_range(rel, offset, offset + length)

    def chunks(self):
        for shard in range(len(self.shard_files)):
            first = shard * self.records_per_shard
            count = self.manifest["store"]["shards"][shard]["records"]
            for name, spec in self.fields.items():
                rel, index, data_end = self._shard_index(name, shard)
                extents = [self._extent(rel, index, data_end, first + i, first, spec) for i in range(count)]
                start, end = min(o for o, _ in extents), max(o + n for o, n in extents)
                blob = self.fs.read_range(rel, start, end)  # the shard's data in one read
                for i, (offset, length) in enumerate(extents):
                    yield f"{self.fs.where(rel)} record {first + i}", blob[offset - start:offset - start + length]

    def _extent(self, rel: str, index: np.ndarray, data_end: int, row: int, first: int, spec) -> tuple[int, int]:
        """(offset, length) of a record's chunk in its shard file, refusing a missing or impossible one."""
        offset, length = (int(v) for v in index[row - first])
        if offset == _EMPTY:
            raise CacheFormatError(f"{self.fs.where(rel)}: record {row} missing from its shard")
        if length > self.max_stored_bytes(spec) or offset + length > data_end:
            raise CacheFormatError(f"{self.fs.where(rel)}: record {row} has an impossible extent "
                                   f"({length} bytes at {offset})")
        return offset, length

    def read(self, rows):
        rows = [int(r) for r in rows]
        out = {name: np.empty((len(rows), *spec.shape), spec.dtype) for name, spec in self.fields.items()}
        for shard, items in self.by_shard(rows).items():
            first = shard * self.records_per_shard
            for name, spec in self.fields.items():
                rel, index, data_end = self._shard_index(name, shard)
                spans = [(*self._extent(rel, index, data_end, row, first, spec), j, row) for j, row in items]
                for run in _runs(sorted(spans)):  # one read per run of adjacent chunks
                    start, end = run[0][0], run[-1][0] + run[-1][1]
                    blob = memoryview(self.fs.read_range(rel, start, end))  # chunks as views, not copies
                    for offset, length, j, row in run:
                        chunk = blob[offset - start:offset - start + length]
                        out[name][j] = self.decode_chunk(chunk, spec, f"{self.fs.where(rel)} record {row}")
        return out


def _runs(spans: list[tuple[int, int, int, int]]) -> list[list]:
    """Group (offset, length, ...) spans, sorted by offset, into runs of back-to-back byte ranges."""
    runs: list[list] = []
    for span in spans:
        if runs and runs[-1][-1][0] + runs[-1][-1][1] == span[0]:
            runs[-1].append(span)
        else:
            runs.append([span])
    return runs

"""Zarr v3 store: one sharded array per codec field, record axis first; chunk = 1 record, shard = N records.

zarr itself writes the metadata (zarr.json). Each extraction shard is exactly one zarr shard per field, written by
one process as one file: the records' chunks, compressed in parallel, then the shard index, the same bytes zarr's
own writer produces (tested), so two writers never touch the same shard file and zarr's read-modify-write of a
shard never happens.

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
from ..files import StrictJSONError, atomic_write_bytes, loads_strict
from .base import StoreReader, StoreWriter
from .format import has_chunk_checksums, zarr_shard_name

_SHUFFLE_NAMES = {0: "noshuffle", 1: "shuffle", 2: "bitshuffle"}
_EMPTY = 2**64 - 1  # zarr's marker of a chunk absent from its shard
MAX_METADATA_BYTES = 1 << 20
# A run's byte range is read as one buffer: under glibc's largest mmap threshold (32 MiB) a freed buffer is reused,
# above it every read pays fresh page faults (a run of 8 x 7 MB chunks read 40 % slower than 8 separate reads).
MAX_RUN_BYTES = 16 << 20


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
            raise ValueError("`embed_images` needs `format` wds (a zarr cache joins images by key)")
        _create_arrays(zarr.storage.LocalStore(self.root), {k: v.to_json() for k, v in self.fields.items()},
                       self.compressor, self.records, self.records_per_shard, self.checksum, overwrite=overwrite)

    def write_shard(self, index, arrays, records, images=None):
        # Each field's shard file is written whole (temporary name, then rename), never read first: a stale or
        # damaged shard from an earlier run takes no part. Records compress in parallel (encode_records).
        for name, spec in self.fields.items():
            path = zarr_shard_name(name, index, len(spec.shape))
            atomic_write_bytes(self.root / path, shard_bytes(self.encode_records(arrays[name], spec),
                                                             self.records_per_shard))


class ZarrReader(StoreReader):
    def __init__(self, fs, manifest):
        super().__init__(fs, manifest)
        self._check_metadata()

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
        return self.kept_index((name, shard), lambda: self._read_shard_index(name, shard))

    def _read_shard_index(self, name: str, shard: int) -> tuple[str, np.ndarray, int]:
        j = list(self.fields).index(name)  # the shard's files follow the fields' order (format.shard_paths)
        rel, size = self.shards.paths(shard)[j], int(self.shards.sizes[shard, j])
        nbytes = self.records_per_shard * 16
        if size < nbytes + 4:
            raise CacheFormatError(f"{self.fs.where(rel)}: shorter than its shard index")
        data = self.fs.read_range(rel, size - nbytes - 4, size)
        if google_crc32c.value(data[:-4]).to_bytes(4, "little") != data[-4:]:
            raise CacheFormatError(f"{self.fs.where(rel)}: shard index checksum mismatch (damaged shard)")
        index = np.frombuffer(data[:-4], dtype="<u8").reshape(self.records_per_shard, 2)
        return rel, index, size - nbytes - 4

    def stored(self, name: str, row: int) -> bytes:
        """One record's field exactly as stored (its compressed chunk): for tools that time or inspect it."""
        rel, index, _ = self._shard_index(name, row // self.records_per_shard)
        offset, length = (int(v) for v in index[row % self.records_per_shard])
        return self.fs.read_range(rel, offset, offset + length)

    def chunks(self):
        for shard in range(len(self.shards)):
            first = shard * self.records_per_shard
            count = self.shards.records_of(shard)
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
        self.decode_chunks(self._chunks_of(rows, out))
        return out

    def _chunks_of(self, rows: list[int], out: dict[str, np.ndarray]):
        """(chunk, spec, where, destination) for every field of `rows`, one byte range read per run of adjacent
        chunks (lazily: the decode pool works on a run while the next one is read)."""
        for shard, items in self.by_shard(rows).items():
            first = shard * self.records_per_shard
            for name, spec in self.fields.items():
                rel, index, data_end = self._shard_index(name, shard)
                spans = [(*self._extent(rel, index, data_end, row, first, spec), j, row) for j, row in items]
                for run in _runs(sorted(spans)):
                    start, end = run[0][0], run[-1][0] + run[-1][1]
                    blob = memoryview(self.fs.read_range(rel, start, end))  # chunks as views, not copies
                    for offset, length, j, row in run:
                        yield (blob[offset - start:offset - start + length], spec,
                               f"{self.fs.where(rel)} record {row}", out[name][j])


def shard_bytes(chunks: list[bytes], per_shard: int) -> bytes:
    """A zarr v3 shard as zarr writes it for this format (`sharding_indexed`, index at the end, index codecs
    `bytes` + `crc32c`): the stored chunks back to back in record order, then per inner chunk its (offset, length)
    as little-endian uint64 (2^64 − 1 for both where the shard holds fewer records), then the index's crc32c."""
    index = np.full((per_shard, 2), _EMPTY, dtype="<u8")
    lengths = np.array([len(c) for c in chunks], dtype="<u8")
    index[:len(chunks), 0] = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(chunks) else []
    index[:len(chunks), 1] = lengths
    return b"".join([*chunks, index.tobytes(), google_crc32c.value(index.tobytes()).to_bytes(4, "little")])


def _runs(spans: list[tuple[int, int, int, int]], max_bytes: int = MAX_RUN_BYTES) -> list[list]:
    """Group (offset, length, ...) spans, sorted by offset, into runs of back-to-back byte ranges of at most
    `max_bytes` (or one chunk): one request each, small enough for the allocator to reuse its buffers."""
    runs: list[list] = []
    for span in spans:
        if runs and runs[-1][-1][0] + runs[-1][-1][1] == span[0] and \
                span[0] + span[1] - runs[-1][0][0] <= max_bytes:
            runs[-1].append(span)
        else:
            runs.append([span])
    return runs

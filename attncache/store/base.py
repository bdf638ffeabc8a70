"""Store interface: a writer that writes whole shards (atomically) and a reader that returns records' fields.

Both formats store the same thing: per record and codec field, the manifest compressor's encoding of the field's
raw little-endian bytes, followed (format version 4 on) by the crc32c of those bytes as 4 little-endian bytes:
exactly what zarr v3's `crc32c` codec appends, so the zarr store declares it and any zarr reader checks it. Readers
check the checksum on every read (a damaged chunk is an error naming the shard and record, never other numbers),
then decompress only with the manifest's compressor and only after checking the size the frame declares against
the manifest (bounded decompression: a hostile frame cannot make a reader allocate more).

Reading decodes each chunk straight into the batch's array (no intermediate buffer, no copy), and decodes the
chunks of a read in a small thread pool; writing compresses a shard's records in the same pool. blosc releases the
GIL, and splits one chunk over its own threads only when called from the main thread, so the pool is what lets
many chunks, handled from the extraction's writer thread or from loader workers, use more than one core.
"""

from __future__ import annotations

import itertools
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np

from ..codecs import FieldSpec
from ..errors import CacheFormatError
from .format import has_chunk_checksums, metadata_paths, shard_paths
from .fs import CacheFS

BLOSC_HEADER = 16
BLOSC_MAX_OVERHEAD = 16  # a blosc1 frame is at most its header longer than the raw bytes
POOL_MIN_BYTES = 256 << 10  # smaller chunks decode faster than a thread hand-off (~40 us here)
CHECKSUM_BYTES = 4  # crc32c, little-endian, after each stored chunk (format version >= 4)
SHARD_INDEXES_KEPT = 256  # shard indexes a reader keeps (a batch of random rows touches at most batch-size shards)


# CRC-32C of a message followed by its own CRC-32C (little-endian) is this constant for every message (the CRC's
# "residue"): checking it needs no copy of the payload without its last 4 bytes.
CRC32C_RESIDUE = 0x48674BC7


def crc32c(data: bytes) -> bytes:
    return google_crc32c.value(data).to_bytes(CHECKSUM_BYTES, "little")


def strip_checksum(data: bytes, where: str) -> memoryview:
    """A stored chunk's payload (a view, not a copy: chunks are megabytes), after checking the crc32c that ends
    it."""
    if len(data) < CHECKSUM_BYTES or google_crc32c.value(np.frombuffer(data, np.uint8)) != CRC32C_RESIDUE:
        raise CacheFormatError(f"{where}: checksum mismatch (damaged or altered data)")
    return memoryview(data)[:-CHECKSUM_BYTES]


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_codec_threads() -> int:
    """Threads that decode a read's chunks or compress a shard's: the usable cores, at most 4 (DataLoader workers
    each have their own pool)."""
    return max(1, min(4, usable_cores()))


_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}  # (pid, threads): a forked child makes its own


def codec_pool(threads: int) -> ThreadPoolExecutor:
    """This process's pool of `threads` compressor threads (blosc releases the GIL)."""
    key = (os.getpid(), threads)
    if key not in _pools:
        _pools[key] = ThreadPoolExecutor(threads, thread_name_prefix="attncache-codec")
    return _pools[key]


class StoreWriter:
    format: str = ""

    def __init__(self, root: Path, fields: dict[str, FieldSpec], compressor: dict | None, records: int,
                 records_per_shard: int, embed_images: bool = False, checksum: bool = True):
        self.root, self.fields, self.compressor, self.checksum = Path(root), fields, compressor, checksum
        self.records, self.records_per_shard, self.embed_images = records, records_per_shard, embed_images
        self.codec = numcodecs.get_codec(dict(compressor)) if compressor else None
        self.threads = default_codec_threads()  # compressor threads (extraction sets what its teacher leaves free)

    def shard_paths(self, index: int) -> list[str]:
        """Relative paths of the files that make up shard `index` once written."""
        return shard_paths(self.format, {k: v.to_json() for k, v in self.fields.items()}, index)

    def metadata_paths(self) -> list[str]:
        """Relative paths of format metadata files (zarr.json) written at creation."""
        return metadata_paths(self.format, self.fields)

    def encode(self, array: np.ndarray, spec: FieldSpec) -> bytes:
        """One record's field as stored: the compressor over its raw little-endian bytes, then its crc32c."""
        raw = np.ascontiguousarray(array, dtype=np.dtype(spec.dtype).newbyteorder("<"))
        data = bytes(self.codec.encode(raw)) if self.codec else raw.tobytes()
        return data + crc32c(data) if self.checksum else data

    def encode_records(self, arrays: np.ndarray, spec: FieldSpec) -> list[bytes]:
        """Each record's field as stored, compressed on the codec pool when they are large: one writer thread
        compresses at one core's speed, which on a GPU is far below the teacher's rate."""
        if len(arrays) < 2 or spec.nbytes < POOL_MIN_BYTES or self.threads < 2:
            return [self.encode(a, spec) for a in arrays]
        return list(codec_pool(self.threads).map(lambda a: self.encode(a, spec), arrays))

    def write_shard(self, index: int, arrays: dict[str, np.ndarray], records: list[dict],
                    images: list[tuple[bytes, str]] | None = None) -> None:
        raise NotImplementedError


class StoreReader:
    def __init__(self, fs: CacheFS, manifest: dict):
        self.fs, self.manifest = fs, manifest
        self.threads = default_codec_threads()  # decompressor threads per read
        self.fields = {name: FieldSpec(tuple(s["shape"]), s["dtype"])
                       for name, s in manifest["codec"]["fields"].items()}
        self.compressor = manifest["codec"]["compressor"]
        self.checksum = has_chunk_checksums(manifest)
        self.records_per_shard = manifest["store"]["records_per_shard"]
        self.shards = manifest["store"]["shards"]  # a ShardList (store/shards.py): sizes and sha256 as arrays
        self._shard_indexes: OrderedDict = OrderedDict()

    def kept_index(self, key, load):
        """A shard's index (where each record lies in it), read by `load()` once and kept among the last
        SHARD_INDEXES_KEPT: an epoch's random reads touch every shard, and a worker keeping them all would grow by
        the whole cache's index (20,000 shards of an ImageNet cache) over the epoch."""
        index = self._shard_indexes.get(key)
        if index is None:
            index = self._shard_indexes[key] = load()
            if len(self._shard_indexes) > SHARD_INDEXES_KEPT:
                self._shard_indexes.popitem(last=False)
        else:
            self._shard_indexes.move_to_end(key)
        return index

    def read(self, rows: list[int]) -> dict[str, np.ndarray]:
        """{field: (len(rows), *shape)} numpy arrays for the given record rows."""
        raise NotImplementedError

    def read_images(self, rows: list[int]) -> list[bytes]:
        raise CacheFormatError(f"{self.fs.url}: this store carries no images")

    def max_stored_bytes(self, spec: FieldSpec) -> int:
        return spec.nbytes + (BLOSC_MAX_OVERHEAD if self.compressor else 0) + (CHECKSUM_BYTES if self.checksum else 0)

    def decode_chunk(self, data: bytes, spec: FieldSpec, where: str, out: np.ndarray | None = None) -> np.ndarray:
        """One stored chunk -> the field's array (written into `out` when given): checksum first, then bounded
        decompression."""
        if self.checksum:
            data = strip_checksum(data, where)
        return decompress_bounded(self.compressor, data, spec, where, out)

    def decode_chunks(self, chunks) -> None:
        """Decode an iterable of (data, spec, where, out) into their `out` arrays. Large chunks decode on the pool
        as the iterable yields them (reading the next byte range overlaps decoding the last); small ones, where a
        hand-off costs more than the decode, and a read of one chunk (blosc splits it over its own threads) decode
        here. The first damaged chunk, in the iterable's order, raises its error."""
        chunks = iter(chunks)
        head = list(itertools.islice(chunks, 2))
        if len(head) < 2 or self.threads < 2:
            for chunk in itertools.chain(head, chunks):
                self.decode_chunk(*chunk)
            return
        pool, futures = codec_pool(self.threads), []
        try:
            for chunk in itertools.chain(head, chunks):
                if chunk[1].nbytes >= POOL_MIN_BYTES:
                    futures.append(pool.submit(self.decode_chunk, *chunk))
                else:
                    self.decode_chunk(*chunk)
        finally:
            wait(futures)  # no decode still writes into the arrays once this returns or raises
        for future in futures:
            future.result()

    def check_chunk(self, data: bytes, where: str) -> None:
        """What `verify --quick` checks of each chunk without decompressing it: its checksum."""
        if self.checksum:
            strip_checksum(data, where)

    def chunks(self):
        """Every stored chunk as (where, bytes), shard by shard (for `verify --quick`)."""
        raise NotImplementedError

    def by_shard(self, rows: list[int]) -> dict[int, list[tuple[int, int]]]:
        """{shard: [(position in `rows`, row), ...]} in the order given."""
        out: dict[int, list[tuple[int, int]]] = {}
        for j, row in enumerate(rows):
            if not 0 <= row < self.manifest["store"]["records"]:
                raise IndexError(row)
            out.setdefault(row // self.records_per_shard, []).append((j, row))
        return out


def blosc_header_sizes(data: bytes, where: str) -> tuple[int, int]:
    """(uncompressed, compressed) sizes from a blosc1 frame's 16-byte header (little-endian uint32 at 4 and 12)."""
    if len(data) < BLOSC_HEADER:
        raise CacheFormatError(f"{where}: not a blosc buffer ({len(data)} bytes)")
    return int.from_bytes(data[4:8], "little"), int.from_bytes(data[12:16], "little")


def decompress_bounded(codec_config: dict | None, data: bytes | memoryview, spec: FieldSpec,
                       where: str, out: np.ndarray | None = None) -> np.ndarray:
    """Decode one record's field, refusing anything whose declared size differs from the manifest's; into `out`
    (C-contiguous, the field's shape and dtype) when given."""
    dtype = np.dtype(spec.dtype).newbyteorder("<")
    if out is None:
        out = np.empty(spec.shape, dtype)
    if out.shape != tuple(spec.shape) or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"{where}: cannot decode into a {out.dtype} array of shape {out.shape}")
    raw = out.reshape(-1).view(np.uint8)
    if codec_config is None:
        if len(data) != spec.nbytes:
            raise CacheFormatError(f"{where}: {len(data)} bytes, expected {spec.nbytes}")
        raw[:] = np.frombuffer(data, np.uint8)
        return out
    # the schema admits blosc only
    nbytes, cbytes = blosc_header_sizes(data, where)
    if nbytes != spec.nbytes or cbytes != len(data):
        raise CacheFormatError(f"{where}: blosc header declares {nbytes} bytes in {cbytes}, expected "
                               f"{spec.nbytes} in {len(data)}")
    try:
        numcodecs.blosc.decompress(data, raw)
    except Exception as exc:  # noqa: BLE001
        raise CacheFormatError(f"{where}: corrupt blosc data ({exc})") from exc
    return out

"""Fixed-width binary tables: per-record metadata that a reader touches only where it reads.

A table is rows of one numpy structured dtype (packed, little-endian), cut into blocks of `rows_per_block` rows;
each block is followed by the crc32c of its bytes and then of its index as 8 little-endian bytes (4 bytes,
little-endian): a block moved to another place fails its check like a damaged one. Block b starts at byte
b * (rows_per_block * row_bytes + 4), so finding a row is arithmetic: there is no offset index that could lie, and
a table's size follows from (rows, rows_per_block, row_bytes), which the validated manifest states.

Why this and not Arrow IPC or Parquet (both read by range too): a cache is untrusted input, and a reader here must
(1) check a checksum on every read, as the maps have, (2) allocate nothing the manifest did not bound and (3) cost
a few microseconds per row with no per-record Python object. Parquet pages are compressed and variable-length
(a row needs its page decoded and its offsets trusted); Arrow IPC files carry offsets and lengths of their own to
validate and no checksums. Mosaic streaming's shards (a fixed-width header and per-sample offsets) and litdata's
chunks (an offset table per chunk) make the same choice of plain fixed-width records read by offset; we drop the
offsets altogether because every column here has a fixed width (keys, the one variable-length field, live in a
byte heap addressed by (offset, length) columns of the samples table: a `u1` table of its own).

Reading keeps one file descriptor per table and process, reads a block with `os.pread` (no memory map: mapped
pages would count in every loader worker's PSS), checks its crc32c, and keeps the last `cache_blocks` verified
blocks (an LRU). A remote cache's tables are read from a node-local copy (store/mirror.py), downloaded once per
node and checked against the manifest's sha256: random access over an epoch touches every block anyway, and one
download per node is what an object store's request limits want (never one per loader worker).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import OrderedDict
from pathlib import Path

import google_crc32c
import numpy as np

from ..errors import CacheFormatError
from ..files import PARTIAL_SUFFIX, file_mode

CHECKSUM_BYTES = 4
DEFAULT_CACHE_BLOCKS = 64


def table_bytes(rows: int, rows_per_block: int, row_bytes: int) -> int:
    """The size of a table file: every row's bytes and a checksum per block."""
    return rows * row_bytes + -(-rows // rows_per_block) * CHECKSUM_BYTES


def block_checksum(block: bytes, index: int) -> bytes:
    """crc32c of a block's bytes followed by its index (u64 little-endian), as 4 little-endian bytes."""
    crc = google_crc32c.extend(google_crc32c.value(block), int(index).to_bytes(8, "little"))
    return crc.to_bytes(CHECKSUM_BYTES, "little")


def rows_per_block_for(row_bytes: int, target_bytes: int = 4 << 10) -> int:
    """Blocks of about a page (4 KiB): a random row reads one block, and a pread of 16 KiB from the page cache
    costs ~3x one of 4 KiB (measured: ~15 vs ~5 us), while a block's checksum stays 0.1 % of its bytes."""
    return max(1, target_bytes // max(1, row_bytes))


class TableWriter:
    """Rows appended in order, written block by block to a temporary file and renamed into place on `close()`
    (a kill leaves no table, never half of one); the sha256 is taken as the bytes go out."""

    def __init__(self, path: str | Path, dtype: np.dtype, rows_per_block: int):
        self.path, self.dtype, self.rows_per_block = Path(path), np.dtype(dtype), rows_per_block
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=PARTIAL_SUFFIX)
        self.file = os.fdopen(fd, "wb")
        self.sha256, self.rows, self.bytes, self.blocks = hashlib.sha256(), 0, 0, 0
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0

    def append(self, rows: np.ndarray) -> None:
        if rows.dtype != self.dtype:
            raise ValueError(f"{self.path.name}: rows of dtype {rows.dtype}, the table's is {self.dtype}")
        self.pending.append(rows)
        self.pending_rows += len(rows)
        if self.pending_rows >= self.rows_per_block:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        data = np.concatenate(self.pending) if self.pending else np.empty(0, self.dtype)
        whole = len(data) if final else len(data) // self.rows_per_block * self.rows_per_block
        for start in range(0, whole, self.rows_per_block):
            block = data[start:start + self.rows_per_block].tobytes()
            self._write(block + block_checksum(block, self.blocks))
            self.blocks += 1
        self.rows += whole
        self.pending = [data[whole:]] if whole < len(data) else []
        self.pending_rows = len(data) - whole

    def _write(self, data: bytes) -> None:
        self.file.write(data)
        self.sha256.update(data)
        self.bytes += len(data)

    def close(self) -> dict:
        """Finish the table; returns its file entry {path, bytes, sha256, table: {...}} (path: the file name)."""
        try:
            self._flush(final=True)
            self.file.flush()
            os.fchmod(self.file.fileno(), file_mode())
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return {"path": self.path.name, "bytes": self.bytes, "sha256": self.sha256.hexdigest(),
                "table": {"rows": self.rows, "rows_per_block": self.rows_per_block, "row_bytes": self.dtype.itemsize}}

    def abort(self) -> None:
        if not self.file.closed:
            self.file.close()
        Path(self.tmp).unlink(missing_ok=True)


def write_table(path: str | Path, rows: np.ndarray, rows_per_block: int) -> dict:
    writer = TableWriter(path, rows.dtype, rows_per_block)
    writer.append(rows)
    return writer.close()


class MemoryTable:
    """A table held in memory (what extraction builds, and what caches of format versions 1-4 are turned into):
    the same interface as `TableReader`."""

    def __init__(self, rows: np.ndarray):
        self.data = rows
        self.rows = len(rows)

    def take(self, indices) -> np.ndarray:
        return self.data[np.asarray(indices, dtype=np.int64)]

    def slice(self, start: int, stop: int) -> np.ndarray:
        return self.data[start:stop]

    def row(self, index: int):
        return self.data[index]


class TableReader:
    """Rows of a table file of a cache, read by block with each block's crc32c checked (see the module doc)."""

    def __init__(self, fs, rel: str, dtype: np.dtype, rows: int, rows_per_block: int,
                 cache_blocks: int = DEFAULT_CACHE_BLOCKS):
        self.fs, self.rel, self.dtype = fs, rel, np.dtype(dtype)
        self.rows, self.rows_per_block = rows, rows_per_block
        self.stride = rows_per_block * self.dtype.itemsize + CHECKSUM_BYTES
        self.cache_blocks = cache_blocks
        self._blocks: OrderedDict[int, np.ndarray] = OrderedDict()
        self._fd: tuple[int, int] | None = None  # (pid, fd): a forked child opens its own

    def __getstate__(self):
        return {**self.__dict__, "_blocks": OrderedDict(), "_fd": None}

    def __del__(self):
        if self._fd is not None and self._fd[0] == os.getpid():
            try:
                os.close(self._fd[1])
            except OSError:
                pass

    def where(self, row: int | None = None) -> str:
        return self.fs.where(self.rel) + (f": row {row}" if row is not None else "")

    def _descriptor(self) -> int:
        if self._fd is None or self._fd[0] != os.getpid():
            self._fd = (os.getpid(), self.fs.open_fd(self.rel))
        return self._fd[1]

    def block(self, b: int) -> np.ndarray:
        """Block b's rows (read-only), its checksum checked when it was read."""
        cached = self._blocks.get(b)
        if cached is not None:
            self._blocks.move_to_end(b)
            return cached
        first = b * self.rows_per_block
        count = min(self.rows_per_block, self.rows - first)
        size = count * self.dtype.itemsize
        data = os.pread(self._descriptor(), size + CHECKSUM_BYTES, b * self.stride)
        if len(data) != size + CHECKSUM_BYTES:
            raise CacheFormatError(f"{self.where()}: truncated (block {b}, rows {first}..{first + count - 1})")
        if block_checksum(data[:size], b) != data[size:]:
            raise CacheFormatError(f"{self.where()}: checksum mismatch in block {b} (rows {first}..{first + count - 1}"
                                   "; damaged or altered)")
        rows = np.frombuffer(data, self.dtype, count)
        self._blocks[b] = rows
        if len(self._blocks) > self.cache_blocks:
            self._blocks.popitem(last=False)
        return rows

    def row(self, index: int):
        if not 0 <= index < self.rows:
            raise IndexError(f"{self.where()}: row {index} outside 0..{self.rows - 1}")
        b, i = divmod(index, self.rows_per_block)
        return self.block(b)[i]

    def take(self, indices) -> np.ndarray:
        """Rows at `indices` (any order, repeats allowed), each block read once."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.rows):
            bad = indices[(indices < 0) | (indices >= self.rows)][0]
            raise IndexError(f"{self.where()}: row {bad} outside 0..{self.rows - 1}")
        out = np.empty(len(indices), self.dtype)
        blocks = indices // self.rows_per_block
        order = np.argsort(blocks, kind="stable")  # the indices grouped by block: O(n log n), not O(n x blocks)
        firsts, starts = np.unique(blocks[order], return_index=True)
        for b, at in zip(firsts.tolist(), np.split(order, starts[1:]), strict=True):
            out[at] = self.block(b)[indices[at] - b * self.rows_per_block]
        return out

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) in order (a run of whole blocks, each checked)."""
        start, stop = max(0, start), min(self.rows, stop)
        if stop <= start:
            return np.empty(0, self.dtype)
        first, last = start // self.rows_per_block, (stop - 1) // self.rows_per_block
        parts = [self.block(b) for b in range(first, last + 1)]
        data = np.concatenate(parts) if len(parts) > 1 else parts[0]
        offset = first * self.rows_per_block
        return data[start - offset:stop - offset]

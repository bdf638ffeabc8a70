"""WebDataset store: POSIX tar shards, one tar entry group per record, readable by `webdataset` or `tar`.

Per record `RRRRRRRRRR` (its row number, zero-padded to 10 digits):
  RRRRRRRRRR.json      key, view index, label, image sha256 and view parameters
  RRRRRRRRRR.<field>   the codec field's compressed bytes and their crc32c (e.g. `.maps`)
  RRRRRRRRRR.<ext>     the original image bytes, with --embed-images
Tar headers are fixed (mtime 0, uid/gid 0, mode 0644) so re-extraction reproduces shards byte for byte.

The reader indexes a shard's members once (name -> offset and size, from the tar headers) and then reads records
by byte range: random access for the trainer's shuffles, without extracting anything to disk. Only regular-file
members count, and a shard naming a member twice is refused (which copy would a reader use?).
"""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np

from ..errors import CacheFormatError
from ..files import atomic_write_bytes
from .base import StoreReader, StoreWriter
from .format import wds_shard_name

MAX_IMAGE_BYTES = 256 << 20


def record_id(row: int) -> str:
    return f"{row:010d}"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class WdsWriter(StoreWriter):
    format = "wds"

    def write_shard(self, index, arrays, records, images=None):
        buf = io.BytesIO()
        first = index * self.records_per_shard
        stored = {name: self.encode_records(arrays[name], spec) for name, spec in self.fields.items()}
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for j, meta in enumerate(records):
                rid = record_id(first + j)
                _add(tar, f"{rid}.json", json.dumps(meta, sort_keys=True).encode())
                for name in self.fields:
                    _add(tar, f"{rid}.{name}", stored[name][j])
                if images is not None:
                    data, ext = images[j]
                    _add(tar, f"{rid}.{ext}", data)
        atomic_write_bytes(self.root / wds_shard_name(index), buf.getvalue())


class WdsReader(StoreReader):
    def _shard_index(self, shard: int) -> dict[str, dict[str, tuple[int, int]]]:
        """{record id: {suffix: (offset, size)}} of a shard's regular-file members."""
        rel = wds_shard_name(shard)
        return self.kept_index(shard, lambda: self.fs.call(rel, lambda: self._read_index(rel)))

    def _read_index(self, rel: str) -> dict[str, dict[str, tuple[int, int]]]:
        members: dict[str, dict[str, tuple[int, int]]] = {}
        with self.fs.open(rel) as f:
            try:
                with tarfile.open(fileobj=f, mode="r:") as tar:
                    for m in tar:
                        rid, dot, suffix = m.name.partition(".")
                        if not dot or not m.isfile():
                            continue
                        if suffix in members.setdefault(rid, {}):
                            raise CacheFormatError(f"{self.fs.where(rel)}: member {m.name} appears twice")
                        members[rid][suffix] = (m.offset_data, m.size)
            except tarfile.TarError as exc:
                raise CacheFormatError(f"{self.fs.where(rel)}: not a valid tar ({exc})") from exc
        return members

    def _member(self, row: int, suffix: str | None, limit: int) -> bytes:
        """A record's member (suffix None: its embedded image, whatever its extension), bounded by `limit`."""
        shard = row // self.records_per_shard
        rel, rid = wds_shard_name(shard), record_id(row)
        members = self._shard_index(shard).get(rid, {})
        if suffix is None:
            known = {"json", *self.fields}
            suffix = next((s for s in members if s not in known), None)
            if suffix is None:
                raise CacheFormatError(f"{self.fs.where(rel)}: record {rid} has no embedded image")
        entry = members.get(suffix)
        if entry is None:
            raise CacheFormatError(f"{self.fs.where(rel)}: member {rid}.{suffix} missing")
        offset, size = entry
        if size > limit:
            raise CacheFormatError(f"{self.fs.where(rel)}: member {rid}.{suffix} is {size} bytes, limit {limit}")
        return self.fs.read_range(rel, offset, offset + size)

    def read(self, rows):
        rows = [int(r) for r in rows]
        out = {name: np.empty((len(rows), *spec.shape), spec.dtype) for name, spec in self.fields.items()}
        self.decode_chunks(self._chunks_of(rows, out))
        return out

    def _chunks_of(self, rows: list[int], out: dict):
        """(member bytes, spec, where, destination) for every field of `rows`, read lazily (see decode_chunks)."""
        for _, items in self.by_shard(rows).items():
            for j, row in items:
                for name, spec in self.fields.items():
                    where = f"{self.fs.where(wds_shard_name(row // self.records_per_shard))}:{record_id(row)}.{name}"
                    yield self._member(row, name, self.max_stored_bytes(spec)), spec, where, out[name][j]

    def chunks(self):
        for shard in range(len(self.shards)):
            rel = wds_shard_name(shard)
            first = shard * self.records_per_shard
            for row in range(first, first + self.shards.records_of(shard)):
                for name, spec in self.fields.items():
                    yield f"{self.fs.where(rel)}:{record_id(row)}.{name}", \
                        self._member(row, name, self.max_stored_bytes(spec))

    def read_images(self, rows):
        """The embedded image bytes of each row (caches extracted with --embed-images)."""
        return [self._member(int(row), None, MAX_IMAGE_BYTES) for row in rows]

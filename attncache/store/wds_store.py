"""WebDataset store: POSIX tar shards, one tar entry group per record, readable by `webdataset` or `tar`.

Per record `RRRRRRRRRR` (its row number, zero-padded to 10 digits):
  RRRRRRRRRR.json      key, view index, label, image sha256 and view parameters
  RRRRRRRRRR.<field>   the codec field's compressed bytes (e.g. `.maps`)
  RRRRRRRRRR.<ext>     the original image bytes, with --embed-images
Tar headers are fixed (mtime 0, uid/gid 0, mode 0644) so re-extraction reproduces shards byte for byte.
"""

from __future__ import annotations

import io
import json
import tarfile

import fsspec
import numcodecs
import numpy as np

from ..errors import CacheFormatError
from .base import StoreReader, StoreWriter, decompress_bounded
from .format import atomic_write_bytes

SHARD_DIR = "shards"
MAX_META_BYTES = 1 << 20
MAX_IMAGE_BYTES = 256 << 20


def shard_name(index: int) -> str:
    return f"{SHARD_DIR}/shard-{index:06d}.tar"


def record_id(row: int) -> str:
    return f"{row:010d}"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class WdsWriter(StoreWriter):
    format = "wds"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.codec = numcodecs.get_codec(dict(self.compressor)) if self.compressor else None

    def shard_paths(self, index):
        return [shard_name(index)]

    def write_shard(self, index, arrays, records, images=None):
        buf = io.BytesIO()
        first = index * self.records_per_shard
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for j, meta in enumerate(records):
                rid = record_id(first + j)
                _add(tar, f"{rid}.json", json.dumps(meta, sort_keys=True).encode())
                for name, spec in self.fields.items():
                    raw = np.ascontiguousarray(arrays[name][j], dtype=np.dtype(spec.dtype).newbyteorder("<"))
                    _add(tar, f"{rid}.{name}", bytes(self.codec.encode(raw)) if self.codec else raw.tobytes())
                if images is not None:
                    data, ext = images[j]
                    _add(tar, f"{rid}.{ext}", data)
        atomic_write_bytes(self.root / shard_name(index), buf.getvalue())


class WdsReader(StoreReader):
    """Random access into tar shards through a member-offset index (never extracts anything to disk)."""

    def __init__(self, root, manifest):
        super().__init__(root, manifest)
        self.compressor = manifest["codec"].get("compressor")
        self._index: dict[int, dict[str, tuple[int, int]]] = {}

    def _shard_index(self, shard: int) -> dict[str, tuple[int, int]]:
        if shard not in self._index:
            members = {}
            with fsspec.open(f"{self.root}/{shard_name(shard)}", "rb") as f:
                try:
                    with tarfile.open(fileobj=f, mode="r:") as tar:
                        for m in tar:
                            if m.isfile():
                                members[m.name] = (m.offset_data, m.size)
                except tarfile.TarError as exc:
                    raise CacheFormatError(f"{shard_name(shard)}: not a valid tar ({exc})") from exc
            self._index[shard] = members
        return self._index[shard]

    def _member(self, f, shard: int, name: str, limit: int) -> bytes:
        entry = self._shard_index(shard).get(name)
        if entry is None:
            raise CacheFormatError(f"{shard_name(shard)}: member {name} missing")
        offset, size = entry
        if size > limit:
            raise CacheFormatError(f"{shard_name(shard)}: member {name} is {size} bytes, limit {limit}")
        f.seek(offset)
        return f.read(size)

    def read(self, rows):
        out = {name: np.empty((len(rows), *spec.shape), spec.dtype) for name, spec in self.fields.items()}
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for j, row in enumerate(rows):
            by_shard.setdefault(row // self.records_per_shard, []).append((j, row))
        for shard, items in by_shard.items():
            with fsspec.open(f"{self.root}/{shard_name(shard)}", "rb") as f:
                for j, row in items:
                    for name, spec in self.fields.items():
                        where = f"{shard_name(shard)}:{record_id(row)}.{name}"
                        data = self._member(f, shard, f"{record_id(row)}.{name}", spec.nbytes + 1024)
                        out[name][j] = decompress_bounded(self.compressor, data, spec, where)
        return out

    def read_meta(self, row: int) -> dict:
        shard = row // self.records_per_shard
        with fsspec.open(f"{self.root}/{shard_name(shard)}", "rb") as f:
            data = self._member(f, shard, f"{record_id(row)}.json", MAX_META_BYTES)
        return json.loads(data)

    def read_images(self, rows: list[int]) -> list[bytes]:
        """The embedded image bytes of each row (caches extracted with --embed-images)."""
        out: list[bytes] = []
        for row in rows:
            shard = row // self.records_per_shard
            prefix = f"{record_id(row)}."
            fields = {f"{prefix}{name}" for name in (*self.fields, "json")}
            name = next((m for m in self._shard_index(shard) if m.startswith(prefix) and m not in fields), None)
            if name is None:
                raise CacheFormatError(f"{shard_name(shard)}: record {record_id(row)} has no embedded image")
            with fsspec.open(f"{self.root}/{shard_name(shard)}", "rb") as f:
                out.append(self._member(f, shard, name, MAX_IMAGE_BYTES))
        return out

"""Store interface: a writer that writes whole shards (atomically) and a reader that returns records' field arrays.

Both formats store the same thing: per record and codec field, the compressor's encoding of the field's raw
little-endian bytes. Readers decompress with a size check against the manifest (bounded decompression).
"""

from __future__ import annotations

from pathlib import Path

import numcodecs
import numpy as np

from ..codecs import FieldSpec
from ..errors import CacheFormatError


class StoreWriter:
    format: str = ""

    def __init__(self, root: Path, fields: dict[str, FieldSpec], compressor: dict, records: int,
                 records_per_shard: int, embed_images: bool = False):
        self.root, self.fields, self.compressor = Path(root), fields, compressor
        self.records, self.records_per_shard, self.embed_images = records, records_per_shard, embed_images

    def shard_paths(self, index: int) -> list[str]:
        """Relative paths of the files that make up shard `index` once written."""
        raise NotImplementedError

    def metadata_paths(self) -> list[str]:
        """Relative paths of format metadata files (zarr.json) written at creation."""
        return []

    def write_shard(self, index: int, arrays: dict[str, np.ndarray], records: list[dict],
                    images: list[tuple[bytes, str]] | None = None) -> None:
        raise NotImplementedError


class StoreReader:
    def __init__(self, root: str, manifest: dict):
        self.root, self.manifest = root.rstrip("/"), manifest
        self.fields = {name: FieldSpec(tuple(s["shape"]), s["dtype"])
                       for name, s in manifest["codec"]["fields"].items()}
        self.records_per_shard = manifest["store"]["records_per_shard"]

    def read(self, rows: list[int]) -> dict[str, np.ndarray]:
        """{field: (len(rows), *shape)} numpy arrays for the given record rows."""
        raise NotImplementedError


def blosc_header_sizes(data: bytes, where: str) -> tuple[int, int]:
    """(uncompressed, compressed) sizes from a blosc1 frame's 16-byte header (little-endian uint32 at 4 and 12)."""
    if len(data) < 16:
        raise CacheFormatError(f"{where}: not a blosc buffer ({len(data)} bytes)")
    return int.from_bytes(data[4:8], "little"), int.from_bytes(data[12:16], "little")


def decompress_bounded(codec_config: dict, data: bytes, spec: FieldSpec, where: str) -> np.ndarray:
    """Decode one record's field, refusing anything whose declared size differs from the manifest's."""
    if codec_config is None:
        if len(data) != spec.nbytes:
            raise CacheFormatError(f"{where}: {len(data)} bytes, expected {spec.nbytes}")
        raw = data
    elif codec_config.get("id") == "blosc":
        nbytes, cbytes = blosc_header_sizes(data, where)
        if nbytes != spec.nbytes or cbytes != len(data):
            raise CacheFormatError(f"{where}: blosc header declares {nbytes} bytes, expected {spec.nbytes}")
        out = np.empty(spec.nbytes, dtype=np.uint8)
        try:
            numcodecs.blosc.decompress(data, out)
        except Exception as exc:  # noqa: BLE001
            raise CacheFormatError(f"{where}: corrupt blosc data ({exc})") from exc
        raw = out
    else:
        raise CacheFormatError(f"{where}: compressor {codec_config.get('id')!r} not supported")
    return np.frombuffer(raw, dtype=np.dtype(spec.dtype).newbyteorder("<")).reshape(spec.shape)

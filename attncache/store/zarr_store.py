"""Zarr v3 store: one sharded array per codec field, record axis first; chunk = 1 record, shard = N records.

Random access by record. Each extraction shard is exactly one zarr shard, written by one process in one call, so
two writers never touch the same shard file (zarr's read-modify-write of a shared shard loses data).
"""

from __future__ import annotations

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from ..errors import CacheFormatError
from .base import StoreReader, StoreWriter

_SHUFFLE_NAMES = {0: "noshuffle", 1: "shuffle", 2: "bitshuffle"}


def zarr_compressors(config: dict | None) -> list:
    if config is None:
        return []
    if config["id"] != "blosc":
        raise ValueError(f"zarr store: compressor {config['id']!r} unsupported")
    return [BloscCodec(cname=config["cname"], clevel=config["clevel"], shuffle=_SHUFFLE_NAMES[config["shuffle"]],
                       typesize=config.get("typesize", 1), blocksize=config.get("blocksize", 0))]


class ZarrWriter(StoreWriter):
    format = "zarr"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.embed_images:
            raise ValueError("--embed-images needs --format wds (a zarr cache joins images by key)")
        store = zarr.storage.LocalStore(self.root)
        group = zarr.open_group(store, mode="a", zarr_format=3)
        self.arrays = {}
        for name, spec in self.fields.items():
            if name in group:
                self.arrays[name] = group[name]
                continue
            self.arrays[name] = group.create_array(
                name, shape=(self.records, *spec.shape), dtype=spec.dtype, chunks=(1, *spec.shape),
                shards=(self.records_per_shard, *spec.shape), compressors=zarr_compressors(self.compressor),
                fill_value=0, dimension_names=("record", *[f"d{i}" for i in range(len(spec.shape))]),
            )

    def shard_paths(self, index):
        return [f"{name}/c/{index}" + "/0" * len(spec.shape) for name, spec in self.fields.items()]

    def metadata_paths(self):
        return ["zarr.json"] + [f"{name}/zarr.json" for name in self.fields]

    def write_shard(self, index, arrays, records, images=None):
        # zarr reads an existing shard before writing into it (read-modify-write); a stale or damaged shard from
        # an earlier run must not take part: the shard is rewritten whole.
        for path in self.shard_paths(index):
            (self.root / path).unlink(missing_ok=True)
        first = index * self.records_per_shard
        for name, array in self.arrays.items():
            array[first:first + len(records)] = arrays[name]


class ZarrReader(StoreReader):
    def __init__(self, root, manifest):
        super().__init__(root, manifest)
        group = zarr.open_group(self.root, mode="r", zarr_format=3) if "://" in self.root else \
            zarr.open_group(zarr.storage.LocalStore(self.root, read_only=True), mode="r", zarr_format=3)
        records = manifest["store"]["records"]
        self.arrays = {}
        for name, spec in self.fields.items():
            try:
                array = group[name]
            except KeyError as exc:
                raise CacheFormatError(f"{self.root}: zarr array {name!r} missing") from exc
            expected = (records, *spec.shape)
            if (array.shape != expected or array.dtype != np.dtype(spec.dtype) or array.chunks != (1, *spec.shape)
                    or array.shards != (self.records_per_shard, *spec.shape)):
                raise CacheFormatError(
                    f"{self.root}/{name}: zarr metadata (shape {array.shape}, dtype {array.dtype}, chunks "
                    f"{array.chunks}, shards {array.shards}) disagrees with the manifest (shape {expected})")
            self.arrays[name] = array
        self._present: set[int] = set()

    def _check_shards_exist(self, rows) -> None:
        """zarr reads a missing shard file as fill values (zeros): refuse instead of returning fake maps."""
        import fsspec

        for shard in sorted({int(r) // self.records_per_shard for r in rows} - self._present):
            for f in self.manifest["store"]["shards"][shard]["files"]:
                fs, path = fsspec.core.url_to_fs(f"{self.root}/{f['path']}")
                if not fs.exists(path):
                    raise CacheFormatError(f"{self.root}/{f['path']}: shard file missing")
            self._present.add(shard)

    def read(self, rows):
        rows = np.asarray(rows, dtype=np.int64)
        self._check_shards_exist(rows)
        out = {}
        for name, array in self.arrays.items():
            try:
                # One slice per run of consecutive rows. zarr's orthogonal (fancy) selection over a sharded array
                # is orders of magnitude slower for scattered rows (measured: 14 s vs 0.15 s for 8 rows of 7 MB).
                runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1) if len(rows) else []
                parts = [array[int(run[0]):int(run[-1]) + 1] for run in runs]
                out[name] = parts[0] if len(parts) == 1 else (
                    np.concatenate(parts) if parts else np.empty((0, *array.shape[1:]), array.dtype))
            except (IndexError, KeyError):
                raise
            except Exception as exc:  # noqa: BLE001 - corrupt shard index or blosc frame (numcodecs raises many types)
                raise CacheFormatError(f"{self.root}/{name}: cannot decode records {rows.tolist()[:8]} "
                                       f"({type(exc).__name__}: {exc})") from exc
        return out

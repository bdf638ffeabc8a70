"""An open cache's shard list held as arrays, not as parsed JSON.

A validated manifest's `store.shards` says nothing per shard that the store section does not already imply
except each file's size and sha256 (`format._check_store` requires the index, first record, record count and file
paths to be exactly what `records`, `records_per_shard` and `shard_paths` give). So an open cache keeps those two
as arrays: ~40 bytes per shard file, ~1 MB for the 20,000 shards of an ImageNet ViT-L cache, where the parsed JSON
(a dict per shard and per file, and the path -> entry dict of `CacheFS.known`) took ~40 MB in every process that
opened the cache: the trainer and each of its loader workers, 72 processes on an 8-GPU node. Indexing gives the
entry as the manifest spells it, made when asked.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from .format import WDS_SHARD_DIR, shard_paths

_ZARR_SHARD = re.compile(r"^([^/]+)/c/(\d+)(?:/0)*$")
_WDS_SHARD = re.compile(rf"^{WDS_SHARD_DIR}/shard-(\d+)\.tar$")


class ShardList(Sequence):
    """`store.shards` of a validated manifest: sizes (shards, files) and digests (shards, files, 32) as arrays."""

    def __init__(self, store: dict, fields: dict):
        self.format, self.fields = store["format"], fields
        self.records, self.per_shard = store["records"], store["records_per_shard"]
        shards = store["shards"]
        files = len(shard_paths(self.format, fields, 0))
        self.sizes = np.array([[f["bytes"] for f in s["files"]] for s in shards], np.int64).reshape(-1, files)
        self.digests = np.frombuffer(b"".join(bytes.fromhex(f["sha256"]) for s in shards for f in s["files"]),
                                     np.uint8).reshape(-1, files, 32)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = range(len(self))[index]  # negative indices, and IndexError past the end
        return {"index": i, "first_record": i * self.per_shard, "records": self.records_of(i),
                "files": [self.file(i, j) for j in range(self.sizes.shape[1])]}

    def __eq__(self, other) -> bool:  # equal to the manifest's list it was made from
        if not isinstance(other, Sequence) or len(other) != len(self):
            return False
        return all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None

    def records_of(self, i: int) -> int:
        return min(self.per_shard, self.records - i * self.per_shard)

    def paths(self, i: int) -> list[str]:
        return shard_paths(self.format, self.fields, i)

    def file(self, i: int, j: int) -> dict:
        return {"path": self.paths(i)[j], "bytes": int(self.sizes[i, j]), "sha256": self.digests[i, j].tobytes().hex()}

    def locate(self, rel: str) -> tuple[int, int] | None:
        """(shard, file) of a shard file's path, or None when `rel` is none of them."""
        match = (_WDS_SHARD if self.format == "wds" else _ZARR_SHARD).match(rel)
        if match is None:
            return None
        i = int(match.groups()[-1])
        if not 0 <= i < len(self):
            return None
        paths = self.paths(i)
        return (i, paths.index(rel)) if rel in paths else None

    def total_bytes(self) -> int:
        return int(self.sizes.sum())


class ManifestFiles(Mapping):
    """Every file a validated manifest names, path -> {path, bytes, sha256} (what `CacheFS.known` holds): the few
    others in a dict, the shard files found through the `ShardList`."""

    def __init__(self, others: dict[str, dict], shards: ShardList):
        self.others, self.shards = others, shards

    def __getitem__(self, rel: str) -> dict:
        if rel in self.others:
            return self.others[rel]
        at = self.shards.locate(rel)
        if at is None:
            raise KeyError(rel)
        return self.shards.file(*at)

    def __iter__(self):
        yield from self.others
        for i in range(len(self.shards)):
            yield from self.shards.paths(i)

    def __len__(self) -> int:
        return len(self.others) + self.shards.sizes.size


def compact(manifest: dict) -> ManifestFiles:
    """Replace a validated manifest's `store.shards` by a `ShardList` (in place); returns the manifest's files."""
    store = manifest["store"]
    if not isinstance(store["shards"], ShardList):  # (a loader worker's manifest is compact already)
        store["shards"] = ShardList(store, manifest["codec"]["fields"])
    shards = store["shards"]
    others = {f["path"]: f for f in store["metadata_files"]}
    others.update({f["path"]: f for f in manifest["files"].values()})
    return ManifestFiles(others, shards)

"""Reading a cache: `open_cache(path_or_url)` validates the manifest and gives access by (key, view) or row.

Local directories and fsspec URLs (https://, s3://, ...) read the same way, through one `CacheFS` carrying the
storage options. Nothing here unpickles: the manifest is strict JSON, the per-record metadata fixed-width tables
read by row with a checksum per block (store/records.py; versions 1-4: JSONL files checked against their sha256),
the maps raw arrays with dtype and shape taken from the validated manifest.

Opening costs the manifest alone, whatever the number of records: a record's view and sample are read when asked
for. A pickled cache (what a DataLoader worker gets) carries the manifest's bytes, so a worker neither fetches nor
re-validates it, and is bound to exactly the cache the main process opened. `CacheFiles` is the same without the
codec: what copying and verifying a cache need.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from .codecs import get_codec
from .errors import AttncacheError, CacheFormatError
from .files import StrictJSONError
from .store import READERS, CacheFS
from .store.format import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    SAMPLES,
    VIEWS,
    capture_shape,
    check_samples,
    check_views,
    parse_jsonl,
    parse_manifest,
    row_of,
    sample_and_view,
    uses_tables,
)
from .store.records import RecordTables, memory_tables
from .store.shards import compact
from .teacher import TeacherSpec
from .views import View, ViewPolicy


@dataclass
class CacheItem:
    key: str
    view_index: int
    label: int
    view: View
    maps: torch.Tensor  # (L, H, N, N) float32, decoded: probs or logits (cache.decodes_to); (L, H, 1, N) for `cls`


class CacheFiles:
    """A cache's manifest (read, pinned and validated) and what it names: the files, the record tables and the store
    reader, and no codec. `attncache copy` and `verify` need only this: each file is moved or hashed by its manifest
    entry, a side file like any other, so a cache copies and verifies whatever its codec."""

    check_codec = False  # the manifest rules that need its codec built (store/format.py); a `Cache` checks them

    def __init__(self, root: str, storage_options: dict | None = None, manifest_sha256: str | None = None,
                 manifest_bytes: bytes | None = None, validated: dict | None = None):
        self.fs = CacheFS(root, storage_options)
        self.root = self.fs.url
        if validated is not None:  # a loader worker: the manifest its parent read, pinned and validated
            self.manifest_sha256, self.manifest_bytes, self.manifest = manifest_sha256, None, validated
        else:
            self._read_and_validate(manifest_bytes, manifest_sha256)
        m = self.manifest
        # The shard list as arrays (store/shards.py: ~1 MB for 20,000 shards, not ~40 MB of JSON per process);
        # `known`: every file's size for range reads and sha256 for --cache-dir.
        self.fs.known = compact(m)
        self.num_samples: int = m["dataset"]["num_samples"]
        self.views_per_image: int = m["views"]["views_per_image"]
        # versions 5 on: tables read by row; before: JSONL files parsed whole on first use (small caches)
        self._records: RecordTables | None = RecordTables.open(self.fs, m) if uses_tables(m) else None
        self.reader = READERS[m["store"]["format"]](self.fs, m)

    def _read_and_validate(self, data: bytes | None, manifest_sha256: str | None) -> None:
        data = data if data is not None else self._read_manifest()
        # The manifest names every other file's sha256: pinning its own (as published beside the URL) pins all.
        self.manifest_sha256 = hashlib.sha256(data).hexdigest()
        if manifest_sha256 is not None and manifest_sha256.lower() != self.manifest_sha256:
            raise CacheFormatError(f"{self.fs.where(MANIFEST)}: sha256 {self.manifest_sha256[:16]}..., expected "
                                   f"{manifest_sha256[:16]}... (not the cache that was published, or it changed "
                                   "since it was opened)")
        self.manifest_bytes = data  # exactly what was read, validated and (with manifest_sha256) pinned
        try:
            self.manifest = parse_manifest(data, codec=self.check_codec)
        except (CacheFormatError, StrictJSONError) as exc:
            raise CacheFormatError(f"{self.root}/{MANIFEST}: {str(exc).removeprefix('manifest: ')}") from exc

    def _read_manifest(self) -> bytes:
        try:
            return self.fs.read(MANIFEST, MAX_MANIFEST_BYTES)
        except CacheFormatError as exc:
            if not self.fs.exists(MANIFEST):
                raise CacheFormatError(f"{self.root}: not an attncache cache ({MANIFEST} missing)") from exc
            raise

    @property
    def storage_options(self) -> dict:
        return self.fs.storage_options

    def _file(self, name: str) -> bytes:
        """One of the manifest's `files`, whole, checked against its size and sha256."""
        entry = self.manifest["files"][name]
        data = self.fs.read(name, entry["bytes"])
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CacheFormatError(f"{self.fs.where(name)}: does not match the size and sha256 in the manifest")
        return data

    @property
    def records(self) -> RecordTables:
        """The per-record metadata (samples and views), read by row."""
        if self._records is None:  # versions 1-4: parsed and checked whole, once
            where = {name: self.fs.where(name) for name in (SAMPLES, VIEWS)}
            samples = check_samples(parse_jsonl(self._file(SAMPLES), where[SAMPLES]), self.manifest, where[SAMPLES])
            views = check_views(parse_jsonl(self._file(VIEWS), where[VIEWS]), samples, self.manifest, where[VIEWS])
            from .store.records import TABLES

            self._records = memory_tables(samples, views, self.manifest,
                                          {name: where[SAMPLES if name != "views.bin" else VIEWS] for name in TABLES})
        return self._records

    def __len__(self) -> int:
        return self.manifest["store"]["records"]

    def check_records(self) -> int:
        """Read and check every sample and view (what `verify` does); returns the records checked."""
        for index in range(self.num_samples):
            self.records.sample(index)
        for row in range(len(self)):
            self.records.view(row)
        return len(self)


class Cache(CacheFiles):
    """A cache to read: its records by (key, view) or row, decoded by its codec, which is built and bound to the
    cache's side files at open."""

    check_codec = True

    def __init__(self, root: str, storage_options: dict | None = None, manifest_sha256: str | None = None,
                 manifest_bytes: bytes | None = None, validated: dict | None = None):
        super().__init__(root, storage_options, manifest_sha256, manifest_bytes, validated)
        m = self.manifest
        self.teacher = TeacherSpec.from_json(m["teacher"])
        self.layers: list[int] = m["capture"]["layers"]
        self.payload: str = m["capture"]["payload"]
        self.codec = get_codec(m["codec"]["name"], **m["codec"]["params"])
        # read and checked now: decoding cannot start without them
        self.codec.bind({side.name: self._file(side.name) for side in self.codec.side_files}, capture_shape(m),
                        self.fs.where)
        self.decodes_to: str = self.codec.decodes_to(self.payload)  # "probs" or "logits"
        self.policy = ViewPolicy.from_json(m["views"])  # how the views were drawn (augmentation, mixing)

    def __reduce__(self):
        # A DataLoader worker reopens the cache with the same filesystem options and the manifest this process
        # read, pinned and validated, in its compact form (the shard list as arrays): no worker fetches or parses
        # the manifest again (6 MB of JSON for 20,000 shards), and none can see another cache than the main process.
        return _reopen, (self.root, self.fs.storage_options, self.manifest_sha256, self.manifest)

    def row(self, key: str, view: int = 0) -> int:
        index = self.records.index_of(key)
        if index is None:
            raise KeyError(f"{self.root}: no sample {key!r}")
        if not 0 <= view < self.views_per_image:
            raise KeyError(f"{self.root}: sample {key!r} has views 0..{self.views_per_image - 1}, not {view}")
        return row_of(index, view, self.num_samples)

    def sample(self, row: int) -> dict:
        """The image record (key, label, sha256, width, height) of a row."""
        return self.records.sample(sample_and_view(row, self.num_samples)[0])

    def sample_at(self, index: int) -> dict:
        """The image record of sample `index` (the images are rows 0..num_samples - 1 of every view)."""
        return self.records.sample(index)

    def view(self, row: int) -> View:
        """The stored view parameters of a record (what `render()` replays), checked."""
        return self.records.view(row)

    def view_json(self, row: int) -> dict:
        """A record's metadata as JSON, for people and scripts (`attncache inspect --views`): its sample and view
        index, the image record, and the view (a mixing partner also by its sample index)."""
        sample_index, view_index = sample_and_view(row, self.num_samples)
        view = self.view(row)
        out = {"row": row, "sample": sample_index, "view": view_index, "image": self.sample_at(sample_index),
               **view.to_json()}
        if view.mix is not None:
            out["mix"]["partner_sample"] = view.mix.partner_index
        return out

    def parse_rows(self, text: str) -> list[int]:
        """Rows named like `5`, `0:10` (a half-open range) or `3,7,9`; each must be a record of this cache."""
        rows = []
        for part in text.split(","):
            try:
                if ":" in part:
                    start, stop = (int(x) if x.strip() else None for x in part.split(":", 1))
                    rows += range(*slice(start, stop).indices(len(self)))
                else:
                    rows.append(int(part))
            except ValueError as exc:
                raise AttncacheError(f"rows {text!r}: expected N, START:STOP or N,N,...") from exc
        bad = next((r for r in rows if not 0 <= r < len(self)), None)
        if bad is not None:
            raise AttncacheError(f"row {bad}: this cache has rows 0..{len(self) - 1}")
        return rows

    def iter_keys(self):
        """Every sample's key in sample order, a chunk (a list) at a time."""
        return self.records.iter_keys()

    def label_range(self) -> tuple[int, int]:
        """(smallest, largest) label over the samples, read a chunk at a time."""
        lo, hi, chunk = None, None, 1 << 16
        for start in range(0, self.num_samples, chunk):
            labels = self.records.labels(np.arange(start, min(self.num_samples, start + chunk)))
            lo = int(labels.min()) if lo is None else min(lo, int(labels.min()))
            hi = int(labels.max()) if hi is None else max(hi, int(labels.max()))
        return lo, hi

    def read_fields(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """The codec's compact fields of these rows, on the CPU (what loader workers hand to the trainer)."""
        return {k: torch.from_numpy(v) for k, v in self.reader.read(list(rows)).items()}

    def decode(self, fields: dict[str, torch.Tensor], device: str | torch.device = "cpu") -> torch.Tensor:
        """Compact fields -> float32 maps on `device` (probs or logits: `decodes_to`); only the compact fields
        travel to the device."""
        return self.codec.decode({k: v.to(device, non_blocking=True) for k, v in fields.items()})

    def read_rows(self, rows: list[int], device: str | torch.device = "cpu") -> torch.Tensor:
        """Decoded maps (len(rows), L, H, N, N) float32 on `device`."""
        return self.decode(self.read_fields(rows), device)

    def item(self, row: int, device: str | torch.device = "cpu") -> CacheItem:
        if not 0 <= row < len(self):
            raise IndexError(row)
        sample = self.sample(row)
        return CacheItem(sample["key"], sample_and_view(row, self.num_samples)[1], sample["label"], self.view(row),
                         self.read_rows([row], device)[0])

    def __getitem__(self, index) -> CacheItem:
        if isinstance(index, tuple):
            return self.item(self.row(*index))
        if isinstance(index, str):
            return self.item(self.row(index, 0))
        return self.item(int(index))

    def summary(self) -> dict:
        m = self.manifest
        stored = m["store"]["shards"].total_bytes()
        raw = len(self) * math.prod(m["capture"]["map_shape"]) * 2
        return {
            "root": self.root, "version": m["version"], "manifest_sha256": self.manifest_sha256,
            "teacher": m["teacher"]["model"], "weights_sha256": m["teacher"]["weights_sha256"][:16],
            "image_size": m["teacher"]["image_size"], "tokens": m["teacher"]["num_tokens"],
            "heads": m["teacher"]["num_heads"], "layers": self.layers, "payload": self.payload,
            "decodes_to": self.decodes_to,
            "codec": m["codec"]["name"], "store": m["store"]["format"],
            "samples": self.num_samples, "views_per_image": self.views_per_image, "records": len(self),
            "shards": len(m["store"]["shards"]), "split": m["views"]["split"],
            "augmentation": _describe(self.policy.augment),
            "shard_bytes": stored, "shard_bytes_per_view": stored / len(self),
            # with embedded images the shards hold more than maps: no compression ratio to speak of
            **({} if m["store"]["embed_images"] else {"ratio_vs_raw_fp16": raw / max(1, stored)}),
            "dataset_fingerprint": m["dataset"]["fingerprint"][:16],
        }


def _describe(a) -> str:
    """The views' augmentation in one line (inspect)."""
    parts = [a.randaugment] if a.randaugment else []
    if a.erase_prob:
        parts.append(f"erase {a.erase_prob} ({a.erase_mode})")
    if a.mixes:
        parts += [f"{name} {alpha}" for name, alpha in (("mixup", a.mixup), ("cutmix", a.cutmix)) if alpha]
    return ", ".join(parts) or "none"


def _reopen(root: str, storage_options: dict, manifest_sha256: str, manifest: dict) -> Cache:
    return Cache(root, storage_options, manifest_sha256, validated=manifest)


def open_cache(root: str, storage_options: dict | None = None, manifest_sha256: str | None = None) -> Cache:
    """Open a cache directory or URL prefix (manifest.json + shards). `manifest_sha256`, when given, must be the
    sha256 of its manifest.json (published with the cache): everything else is bound to it."""
    return Cache(root, storage_options, manifest_sha256)

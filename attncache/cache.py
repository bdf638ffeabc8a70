"""Reading a cache: `open_cache(path_or_url)` validates the manifest and gives access by (key, view) or row.

Local directories and fsspec URLs (https://, s3://, ...) read the same way, through one `CacheFS` carrying the
storage options. Nothing here unpickles: the manifest and indexes are strict JSON (each checked against its sha256
in the manifest when read), the maps are raw arrays with dtype and shape taken from the validated manifest.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from .codecs import get_codec
from .codecs.inputs_klt import load_basis
from .errors import CacheFormatError
from .store import READERS, CacheFS
from .store.format import (
    BASIS,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    PROJECTIONS,
    SAMPLES,
    VIEWS,
    check_samples,
    check_views,
    named_files,
    parse_jsonl,
    parse_manifest,
    row_of,
    sample_and_view,
)
from .teacher import TeacherSpec
from .teacher.projections import load_projections
from .views import View, ViewPolicy


@dataclass
class CacheItem:
    key: str
    view_index: int
    label: int
    view: View
    maps: torch.Tensor  # (L, H, N, N) float32, decoded: probs or logits (cache.decodes_to); (L, H, 1, N) for `cls`


class Cache:
    def __init__(self, root: str, storage_options: dict | None = None, manifest_sha256: str | None = None):
        self.fs = CacheFS(root, storage_options)
        self.root = self.fs.url
        try:
            data = self.fs.read(MANIFEST, MAX_MANIFEST_BYTES)
        except CacheFormatError as exc:
            if not self.fs.exists(MANIFEST):
                raise CacheFormatError(f"{self.root}: not an attncache cache ({MANIFEST} missing)") from exc
            raise
        # The manifest names every other file's sha256: pinning its own (as published beside the URL) pins all.
        self.manifest_sha256 = hashlib.sha256(data).hexdigest()
        if manifest_sha256 is not None and manifest_sha256.lower() != self.manifest_sha256:
            raise CacheFormatError(f"{self.fs.where(MANIFEST)}: sha256 {self.manifest_sha256[:16]}..., expected "
                                   f"{manifest_sha256[:16]}... (not the cache that was published, or it changed "
                                   "since it was opened)")
        try:
            self.manifest = parse_manifest(data)
        except CacheFormatError as exc:
            raise CacheFormatError(f"{self.root}/{MANIFEST}: {str(exc).removeprefix('manifest: ')}") from exc
        m = self.manifest
        self.fs.known = {f["path"]: f for f in named_files(m)}  # sizes for range reads, sha256 for --cache-dir
        self.teacher = TeacherSpec.from_json(m["teacher"])
        self.layers: list[int] = m["capture"]["layers"]
        self.payload: str = m["capture"]["payload"]
        self.codec = get_codec(m["codec"]["name"], **m["codec"]["params"])
        if self.codec.needs_projections:  # read and checked now: decoding cannot start without them
            t = m["teacher"]
            self.codec.bind(load_projections(self._file(PROJECTIONS), len(m["capture"]["layers"]), t["num_heads"],
                                             t["embed_dim"], self.fs.where(PROJECTIONS)))
        if self.codec.needs_basis:
            self.codec.bind_basis(load_basis(self._file(BASIS), len(m["capture"]["layers"]), m["teacher"]["embed_dim"],
                                             self.fs.where(BASIS)))
        self.decodes_to: str = self.codec.decodes_to(self.payload)  # "probs" or "logits"
        self.num_samples: int = m["dataset"]["num_samples"]
        self.views_per_image: int = m["views"]["views_per_image"]
        self.policy = ViewPolicy.from_json(m["views"])  # how the views were drawn (augmentation, mixing)
        self._samples: list[dict] | None = None
        self._views: list[dict] | None = None
        self._parsed_views: list[View] = []
        self._key_index: dict[str, int] | None = None
        self.reader = READERS[m["store"]["format"]](self.fs, m)

    def __reduce__(self):
        # A DataLoader worker reopens the cache with the same filesystem options, pinned to the manifest this
        # process read: a remote cache replaced meanwhile is an error in the worker, never a mix of two caches.
        return open_cache, (self.root, self.fs.storage_options, self.manifest_sha256)

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

    def _index_file(self, name: str) -> list:
        return parse_jsonl(self._file(name), self.fs.where(name))

    @property
    def samples(self) -> list[dict]:
        if self._samples is None:
            self._samples = check_samples(self._index_file(SAMPLES), self.manifest, self.fs.where(SAMPLES))
        return self._samples

    @property
    def views(self) -> list[dict]:
        if self._views is None:
            raw = self._index_file(VIEWS)
            self._parsed_views = check_views(raw, self.samples, self.manifest, self.fs.where(VIEWS))
            self._views = raw
        return self._views

    def __len__(self) -> int:
        return self.manifest["store"]["records"]

    def row(self, key: str, view: int = 0) -> int:
        if self._key_index is None:
            self._key_index = {s["key"]: i for i, s in enumerate(self.samples)}
        if key not in self._key_index:
            raise KeyError(f"{self.root}: no sample {key!r}")
        if not 0 <= view < self.views_per_image:
            raise KeyError(f"{self.root}: sample {key!r} has views 0..{self.views_per_image - 1}, not {view}")
        return row_of(self._key_index[key], view, self.num_samples)

    def sample(self, row: int) -> dict:
        """The image record (key, label, sha256, size) of a row."""
        return self.samples[sample_and_view(row, self.num_samples)[0]]

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
        sample_index, view_index = sample_and_view(row, self.num_samples)
        sample = self.samples[sample_index]
        return CacheItem(sample["key"], view_index, sample["label"], self.view(row),
                         self.read_rows([row], device)[0])

    def view(self, row: int) -> View:
        """The stored view parameters of a record (what `render()` replays)."""
        if self._views is None:
            _ = self.views  # read and checked once, on first use
        return self._parsed_views[row]

    def __getitem__(self, index) -> CacheItem:
        if isinstance(index, tuple):
            return self.item(self.row(*index))
        if isinstance(index, str):
            return self.item(self.row(index, 0))
        return self.item(int(index))

    def summary(self) -> dict:
        m = self.manifest
        stored = sum(f["bytes"] for s in m["store"]["shards"] for f in s["files"])
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


def open_cache(root: str, storage_options: dict | None = None, manifest_sha256: str | None = None) -> Cache:
    """Open a cache directory or URL prefix (manifest.json + shards). `manifest_sha256`, when given, must be the
    sha256 of its manifest.json (published with the cache): everything else is bound to it."""
    return Cache(root, storage_options, manifest_sha256)

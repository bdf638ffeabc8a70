"""Reading a cache: `open_cache(path_or_url)` validates the manifest and gives access by (key, view) or row.

Works the same for local directories and fsspec URLs (https://, s3://, ...). Nothing here unpickles: the manifest
and indexes are JSON, the maps are raw arrays with dtype and shape taken from the validated manifest.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import fsspec
import torch

from .codecs import get_codec
from .errors import AttncacheError, CacheFormatError
from .store import READERS
from .store.format import MANIFEST, SAMPLES, VIEWS, read_jsonl, row_of, sample_and_view, validate_manifest
from .teachers import TeacherSpec
from .views import View

MAX_MANIFEST_BYTES = 64 << 20


@dataclass
class CacheItem:
    key: str
    view_index: int
    label: int
    view: View
    maps: torch.Tensor  # (L, H, N, N) float32, decoded: probs or logits (cache.decodes_to); (L, H, 1, N) for `cls`


class Cache:
    def __init__(self, root: str, storage_options: dict | None = None):
        self.root = str(root).rstrip("/")
        self.storage_options = storage_options or {}
        self.manifest = validate_manifest(json.loads(self._read(MANIFEST, MAX_MANIFEST_BYTES)))
        m = self.manifest
        self.teacher = TeacherSpec.from_json(m["teacher"])
        self.layers: list[int] = m["capture"]["layers"]
        self.payload: str = m["capture"]["payload"]
        self.codec = get_codec(m["codec"]["name"], **m["codec"]["params"])
        self.decodes_to: str = self.codec.decodes_to(self.payload)  # "probs" or "logits"
        self._check_codec()
        self.num_samples: int = m["dataset"]["num_samples"]
        self.views_per_image: int = m["views"]["views_per_image"]
        self._samples: list[dict] | None = None
        self._views: list[dict] | None = None
        self._key_index: dict[str, int] | None = None
        self.reader = READERS[m["store"]["format"]](self.root, m)

    def _check_codec(self) -> None:
        """The manifest's fields and compressor must be exactly what its codec and parameters produce: a reader
        never trusts a shape or dtype the codec would not have written."""
        m, codec = self.manifest, self.codec
        if self.payload not in codec.payloads:
            raise CacheFormatError(f"{self.root}: codec {codec.name!r} cannot hold payload {self.payload!r}")
        expected = codec.fields(self.teacher.capture_shape(len(self.layers)))
        if m["codec"]["fields"] != {k: v.to_json() for k, v in expected.items()}:
            raise CacheFormatError(f"{self.root}: manifest codec.fields do not match codec {codec.name!r} "
                                   f"with params {codec.params}")
        if m["codec"].get("compressor") != codec.compressor():
            raise CacheFormatError(f"{self.root}: manifest codec.compressor does not match codec {codec.name!r}")

    def _read(self, relpath: str, limit: int) -> bytes:
        try:
            with fsspec.open(f"{self.root}/{relpath}", "rb", **self.storage_options) as f:
                data = f.read(limit + 1)
        except FileNotFoundError as exc:
            raise AttncacheError(f"{self.root}: not an attncache cache ({relpath} missing)") from exc
        if len(data) > limit:
            raise CacheFormatError(f"{self.root}/{relpath}: larger than {limit} bytes")
        return data

    @property
    def samples(self) -> list[dict]:
        if self._samples is None:
            entry = self.manifest["files"][SAMPLES]
            self._samples = read_jsonl(self._read(SAMPLES, entry["bytes"]), SAMPLES)
            if len(self._samples) != self.num_samples:
                raise CacheFormatError(f"{SAMPLES}: {len(self._samples)} lines, manifest says {self.num_samples}")
        return self._samples

    @property
    def views(self) -> list[dict]:
        if self._views is None:
            entry = self.manifest["files"][VIEWS]
            self._views = read_jsonl(self._read(VIEWS, entry["bytes"]), VIEWS)
            if len(self._views) != len(self):
                raise CacheFormatError(f"{VIEWS}: {len(self._views)} lines, manifest says {len(self)} records")
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

    def read_rows(self, rows: list[int], device: str | torch.device = "cpu") -> torch.Tensor:
        """Decoded maps (len(rows), L, H, N, N) float32 on `device` (probs or logits: `decodes_to`); only the
        compact fields travel to the device."""
        fields = self.reader.read(list(rows))
        tensors = {k: torch.from_numpy(v).to(device) for k, v in fields.items()}
        return self.codec.decode(tensors)

    def item(self, row: int, device: str | torch.device = "cpu") -> CacheItem:
        if not 0 <= row < len(self):
            raise IndexError(row)
        sample_index, view_index = sample_and_view(row, self.num_samples)
        sample = self.samples[sample_index]
        return CacheItem(sample["key"], view_index, sample["label"], self.view(row),
                         self.read_rows([row], device)[0])

    def view(self, row: int) -> View:
        """The stored view parameters of a record (what `render()` replays)."""
        return View.from_json({k: v for k, v in self.views[row].items() if k not in ("sample", "view")})

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
            "root": self.root,
            "teacher": m["teacher"]["model"], "weights_sha256": m["teacher"]["weights_sha256"][:16],
            "image_size": m["teacher"]["image_size"], "tokens": m["teacher"]["num_tokens"],
            "heads": m["teacher"]["num_heads"], "layers": self.layers, "payload": self.payload,
            "decodes_to": self.decodes_to,
            "codec": m["codec"]["name"], "store": m["store"]["format"],
            "samples": self.num_samples, "views_per_image": self.views_per_image, "records": len(self),
            "shards": len(m["store"]["shards"]), "split": m["views"]["split"],
            "shard_bytes": stored, "shard_bytes_per_view": stored / len(self),
            # with embedded images the shards hold more than maps: no compression ratio to speak of
            **({} if m["store"].get("embed_images") else {"ratio_vs_raw_fp16": raw / max(1, stored)}),
            "dataset_fingerprint": m["dataset"]["fingerprint"][:16],
        }


def open_cache(root: str, storage_options: dict | None = None) -> Cache:
    """Open a cache directory or URL prefix (manifest.json + shards)."""
    return Cache(root, storage_options)

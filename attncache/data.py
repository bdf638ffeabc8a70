"""Image sources: an ImageFolder directory, a WebDataset of images (local or URL), and the embedded demo set.

A source lists its samples once (`scan`: key, label, content hash, size — and a decodability check, so a broken
image is reported by name before the teacher runs) and then hands out image bytes by sample index.
"""

from __future__ import annotations

import functools
import hashlib
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .errors import AttncacheError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
WDS_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff")
WDS_LABEL_FIELDS = ("cls", "label", "class", "target")


@dataclass(frozen=True)
class Sample:
    key: str
    label: int  # -1 when the source has no labels
    sha256: str  # of the encoded image bytes
    width: int
    height: int

    def to_json(self) -> dict:
        return {"key": self.key, "label": self.label, "sha256": self.sha256, "width": self.width, "height": self.height}


def open_image(data: bytes, where: str) -> Image.Image:
    """Decode image bytes fully; errors name the sample."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise AttncacheError(f"{where}: cannot decode image ({exc})") from exc
    return img


def describe_image(data: bytes, key: str, label: int) -> Sample:
    """Hash and size of one image; decodes it fully so corrupt files fail here, not mid-extraction."""
    img = open_image(data, key)
    return Sample(key, label, hashlib.sha256(data).hexdigest(), img.width, img.height)


class Source:
    """A list of samples plus a way to read their bytes. `limit` keeps only the first N samples."""

    description: str
    classes: list[str]
    limit: int | None = None

    def scan(self) -> list[Sample]:
        raise NotImplementedError

    def iter_bytes(self, indices: Sequence[int]) -> Iterator[tuple[int, bytes]]:
        """Bytes of the samples at `indices` (ascending), as (index, bytes)."""
        raise NotImplementedError

    def read_key(self, key: str) -> bytes:
        """Bytes of the image with this key (training joins cached records to images by key)."""
        raise NotImplementedError

    def missing_keys(self, keys: Sequence[str]) -> list[str]:
        """The keys this source cannot provide (checked before training starts)."""
        raise NotImplementedError


class FolderSource(Source):
    """`root/<class>/<image>` (labels from sorted class folders) or a flat folder of images (no labels)."""

    def __init__(self, root: str | Path, limit: int | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise AttncacheError(f"--data {root}: no such directory")
        self.description = f"folder:{self.root.name}"
        subdirs = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.classes = subdirs
        if subdirs:
            files = [(f"{c}/{f.name}", i) for i, c in enumerate(subdirs) for f in sorted((self.root / c).iterdir())
                     if f.suffix.lower() in IMAGE_EXTENSIONS]
        else:
            files = [(f.name, -1) for f in sorted(self.root.iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
        if not files:
            raise AttncacheError(f"--data {root}: no images found ({', '.join(IMAGE_EXTENSIONS)})")
        self._files = files[:limit]

    def scan(self) -> list[Sample]:
        return [describe_image(self._read(key), key, label) for key, label in self._files]

    def _read(self, key: str) -> bytes:
        try:
            return (self.root / key).read_bytes()
        except OSError as exc:
            raise AttncacheError(f"{self.root / key}: cannot read ({exc.strerror})") from exc

    def iter_bytes(self, indices):
        for i in indices:
            yield i, self._read(self._files[i][0])

    def read_key(self, key):
        return self._read(self._checked_key(key))

    def missing_keys(self, keys):
        return [k for k in keys if not (self.root / self._checked_key(k)).is_file()]

    def _checked_key(self, key: str) -> str:
        # Keys come from a cache, which may come from another lab: never let one name a file outside --data.
        parts = key.split("/")
        if key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
            raise AttncacheError(f"cached key {key!r}: not a relative path inside {self.root}")
        return key


class WebDatasetSource(Source):
    """Tar shards of images (webdataset layout: `<key>.jpg`, optional `<key>.cls`), local paths or URLs."""

    def __init__(self, urls: str, limit: int | None = None):
        self.urls, self.limit = urls, limit
        self.description = f"webdataset:{urls}"
        self.classes = []
        self._bytes: dict[str, bytes] | None = None

    def _iter_raw(self) -> Iterator[tuple[str, bytes, int]]:
        import webdataset as wds

        try:
            dataset = wds.WebDataset(self.urls, shardshuffle=False, empty_check=False)
            for n, record in enumerate(dataset):
                if self.limit is not None and n >= self.limit:
                    return
                key = record["__key__"]
                field = next((f for f in WDS_IMAGE_FIELDS if f in record), None)
                if field is None:
                    raise AttncacheError(f"--data {self.urls}: sample {key!r} has no image field ({WDS_IMAGE_FIELDS})")
                label_field = next((f for f in WDS_LABEL_FIELDS if f in record), None)
                label = int(record[label_field].decode().strip()) if label_field else -1
                yield key, record[field], label
        except AttncacheError:
            raise
        except Exception as exc:  # noqa: BLE001 - missing shard, broken tar, unreachable URL
            raise AttncacheError(f"--data {self.urls}: cannot read webdataset ({exc})") from exc

    def scan(self) -> list[Sample]:
        samples = [describe_image(data, key, label) for key, data, label in self._iter_raw()]
        if not samples:
            raise AttncacheError(f"--data {self.urls}: no samples")
        return samples

    def read_key(self, key):
        return self._by_key()[key]

    def missing_keys(self, keys):
        have = self._by_key()
        return [k for k in keys if k not in have]

    def _by_key(self) -> dict[str, bytes]:
        # A tar stream has no random access: training from a webdataset image source holds its bytes in memory
        # (extract with --embed-images for large sets: the cache then carries the images itself).
        if self._bytes is None:
            self._bytes = {key: data for key, data, _ in self._iter_raw()}
        return self._bytes

    def iter_bytes(self, indices):
        wanted = iter(indices)
        target = next(wanted, None)
        for i, (_, data, _) in enumerate(self._iter_raw()):
            if target is None:
                return
            if i == target:
                yield i, data
                target = next(wanted, None)


# ---------------------------------------------------------------------------------------------------------------
# The embedded demo set: coloured shapes drawn procedurally (nothing to download, identical on every machine).

DEMO_CLASSES = ["circle", "cross", "square", "triangle"]


class DemoSource(Source):
    """`per_class` images of each of 4 shape classes, 48x48 PNG; `split` changes the drawing seed."""

    def __init__(self, split: str = "train", per_class: int = 16, limit: int | None = None):
        self.split, self.per_class = split, per_class
        self.description = f"demo:{split}:{per_class}"
        self.classes = list(DEMO_CLASSES)
        self._keys = [(f"{c}/{i:04d}.png", ci) for ci, c in enumerate(DEMO_CLASSES) for i in range(per_class)][:limit]

    def scan(self) -> list[Sample]:
        return [describe_image(self._draw(i), key, label) for i, (key, label) in enumerate(self._keys)]

    def iter_bytes(self, indices):
        for i in indices:
            yield i, self._draw(i)

    def read_key(self, key):
        return self._draw(self._index[key])

    def missing_keys(self, keys):
        return [k for k in keys if k not in self._index]

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {key: i for i, (key, _) in enumerate(self._keys)}

    def _draw(self, index: int) -> bytes:
        key, label = self._keys[index]
        rng = np.random.default_rng([0 if self.split == "train" else 1, index])
        return draw_shape(DEMO_CLASSES[label], rng)


def draw_shape(shape: str, rng, size: int = 48) -> bytes:
    bg = tuple(int(v) for v in rng.integers(0, 96, 3))
    fg = tuple(int(v) for v in rng.integers(128, 256, 3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    r = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    else:  # cross
        w = max(2, r // 3)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fg)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fg)
    noise = rng.integers(-12, 13, (size, size, 3))
    pixels = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def open_source(data: str, split: str = "train", limit: int | None = None) -> Source:
    """`demo` / `demo:N` (N images per class), a directory, or webdataset shard URL(s); first `limit` samples."""
    if data == "demo" or data.startswith("demo:"):
        per_class = int(data.split(":", 1)[1]) if ":" in data else (16 if split == "train" else 8)
        return DemoSource(split=split, per_class=per_class, limit=limit)
    if "://" in data or data.startswith("pipe:") or data.endswith(".tar") or "{" in data:
        if "://" not in data and not data.startswith("pipe:") and "{" not in data and not Path(data).is_file():
            raise AttncacheError(f"--data {data}: no such file")
        return WebDatasetSource(data, limit)
    path = Path(data)
    if not path.exists():
        raise AttncacheError(f"--data {data}: no such file or directory")
    return FolderSource(path, limit)

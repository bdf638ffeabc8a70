"""What every image source gives: a listing of samples, their bytes by index or key, and a scan.

A source first *lists* its samples (key, label, and a cheap `stamp` that changes when the file changes: size and
mtime for a file, offset and size for a tar member), then *scans* them: each image is hashed and fully decoded, so
a corrupt image is named before the teacher runs. The scan runs on a thread pool and reuses the entries of an
earlier scan whose stamp is unchanged, so re-running an interrupted extraction costs what is left, not a full pass.
"""

from __future__ import annotations

import hashlib
import io
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import AttncacheError
from ..store.records import SAMPLE_DTYPE, SampleRows, key_hashes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass(frozen=True)
class Entry:
    """One listed sample: its key, label (-1 when the source has none) and change stamp (None: cannot tell)."""

    key: str
    label: int
    stamp: str | None = None


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
    """Decode image bytes fully; errors name the sample (never a Python object's repr)."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except UnidentifiedImageError as exc:
        raise AttncacheError(f"{where}: cannot decode image (not a format Pillow recognises)") from exc
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt data
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise AttncacheError(f"{where}: cannot decode image ({detail})") from exc
    return img


def describe_image(data: bytes, key: str, label: int, where: str) -> Sample:
    """Hash and size of one image; decodes it fully so corrupt files fail here, not mid-extraction."""
    img = open_image(data, where)
    return Sample(key, label, hashlib.sha256(data).hexdigest(), img.width, img.height)


class Source:
    """A list of samples plus a way to read their bytes."""

    description: str
    classes: list[str]
    streamed: bool = False  # True: images come in one pass, never by key (no mixing partners, no joins)
    option: str = "data"  # the option that named it (`val_data` for a val set): what its errors name
    _keys: dict[str, int] | None = None
    _hashes: np.ndarray | None = None

    def entries(self) -> list[Entry]:
        """The samples in order (cheap: no image is read)."""
        raise NotImplementedError

    def read_index(self, index: int) -> bytes:
        """Bytes of the `index`-th listed sample."""
        raise NotImplementedError

    def where(self, key: str) -> str:
        """How an error names this sample (a file path, a shard and member)."""
        return f"{self.description}:{key}"

    def iter_bytes(self, indices: Sequence[int]) -> Iterator[tuple[int, bytes]]:
        """Bytes of the samples at `indices` (ascending), as (index, bytes)."""
        for i in indices:
            yield i, self.read_index(i)

    def read_key(self, key: str) -> bytes:
        """Bytes of the image with this key (training joins cached records to images by key)."""
        index = self._key_index().get(key)
        if index is None:
            raise AttncacheError(f"image {key!r}: not found in {self.description}")
        return self.read_index(index)

    def missing_keys(self, keys: Sequence[str]) -> list[str]:
        """The keys this source cannot provide (checked before training starts)."""
        have = self._key_index()
        return [k for k in keys if k not in have]

    def key_hashes(self) -> np.ndarray:
        """The hashes of every listed key (`store.records.key_hash`, the cache's key-index hash), sorted: a cache's
        keys are checked against a listing as two sorted arrays, with no Python step per key."""
        if self._hashes is None:
            entries = self.entries()
            self._hashes = np.sort(key_hashes((e.key for e in entries), len(entries)))
        return self._hashes

    def _key_index(self) -> dict[str, int]:
        if self._keys is None:
            self._keys = {e.key: i for i, e in enumerate(self.entries())}
        return self._keys

    def scan(self, workers: int = 4, known: dict[str, dict] | None = None, on_progress=None,
             every: int = 10_000) -> list[Sample]:
        """`scan_rows` as a list of `Sample` (small sources: evaluation sets, benchmarks, tests)."""
        rows = self.scan_rows(workers, known, on_progress, every)
        return [Sample(**s) for s in rows]

    def scan_rows(self, workers: int = 4, known: dict[str, dict] | None = None, on_progress=None,
                  every: int = 10_000, window: int = 1024) -> SampleRows:
        """Every sample hashed and decoded, in listing order, as the samples table's rows (no Python object per
        image is kept: an ImageNet scan holds ~54 bytes and the key per image). `known` maps key -> an earlier
        scan's record (`Sample.to_json()` plus `stamp`): reused where the stamp still matches.
        `on_progress(samples, stamps)` gets each next `every` newly hashed samples (and the last few), so a
        killed scan can resume. At most `window` images are in flight (a pool's `map` would queue a future for
        every image up front)."""
        entries = self.entries()
        known = known or {}

        def one(i: int) -> tuple[Sample, bool]:
            e = entries[i]
            old = known.get(e.key)
            if e.stamp is not None and old is not None and old.get("stamp") == e.stamp:
                return Sample(e.key, e.label, old["sha256"], old["width"], old["height"]), False
            return describe_image(self.read_index(i), e.key, e.label, self.where(e.key)), True

        rows, heap = np.zeros(len(entries), SAMPLE_DTYPE), bytearray()
        fresh: list[tuple[Sample, str | None]] = []
        with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL decodes and hashlib hashes without the GIL
            for i, (sample, hashed) in enumerate(ordered_map(pool, one, len(entries), window)):
                key = sample.key.encode()
                rows[i] = (len(heap), len(key), sample.label, sample.width, sample.height,
                           np.frombuffer(bytes.fromhex(sample.sha256), np.uint8))
                heap += key
                if on_progress is not None and hashed:
                    fresh.append((sample, entries[i].stamp))
                    if len(fresh) >= every:
                        on_progress(*map(list, zip(*fresh, strict=True)))
                        fresh = []
        if on_progress is not None and fresh:
            on_progress(*map(list, zip(*fresh, strict=True)))
        return SampleRows(rows, bytes(heap))


def ordered_map(pool, fn, count: int, window: int):
    """fn(0), fn(1), ... fn(count - 1) run on `pool`, yielded in order, with at most `window` submitted ahead."""
    pending: deque = deque()
    for i in range(count):
        pending.append(pool.submit(fn, i))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()

"""WebDataset image shards: `<key>.jpg` (or png, webp, ...) with an optional `<key>.cls` label, local or by URL.

The source keeps an index of where each image lies (shard, member offset, size), not the images: it is small
enough to hand to every DataLoader worker, and each worker reads the images it needs by offset. Shards read
through a `pipe:` command have no random access: they serve extraction (one sequential pass) but not training by
key (extract such data with --embed-images, and the cache carries the images).
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass

import fsspec
from braceexpand import braceexpand

from ..errors import AttncacheError
from .base import Entry, Source

WDS_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff")
WDS_LABEL_FIELDS = ("cls", "label", "class", "target")
MAX_LABEL_BYTES = 64
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's own split: key up to the basename's first dot


@dataclass(frozen=True)
class _Member:
    key: str
    label: int
    shard: int
    offset: int
    size: int


class WebDatasetSource(Source):
    def __init__(self, urls: str, limit: int | None = None):
        self.urls, self.limit = urls, limit
        self.shards = [u for part in urls.split("::") for u in braceexpand(part)]
        self.description = f"webdataset:{urls}"
        self.classes = []
        self.streamed = any(u.startswith("pipe:") for u in self.shards)
        self._members: list[_Member] | None = None
        self._files: dict[int, object] = {}  # open shard files of this process (never pickled)

    def __getstate__(self):
        return {**self.__dict__, "_files": {}}

    def entries(self) -> list[Entry]:
        return [Entry(m.key, m.label, f"{self.shards[m.shard]}:{m.offset}:{m.size}") for m in self._index()]

    def where(self, key: str) -> str:
        m = self._index()[self._key_index()[key]] if key in self._key_index() else None
        return f"{self.shards[m.shard]}:{key}" if m else f"{self.description}:{key}"

    def read_index(self, index: int) -> bytes:
        if self.streamed:
            raise AttncacheError(f"--data {self.urls}: a pipe: source has no random access to its images; "
                                 "extract with --format wds --embed-images so the cache carries them")
        m = self._index()[index]
        f = self._files.get(m.shard)
        if f is None:
            f = self._files[m.shard] = fsspec.open(self.shards[m.shard], "rb").open()
        f.seek(m.offset)
        return f.read(m.size)

    def iter_bytes(self, indices):
        if not self.streamed:
            yield from super().iter_bytes(indices)
            return
        wanted = iter(indices)
        target = next(wanted, None)
        for i, (_, data) in enumerate(self._stream()):
            if target is None:
                return
            if i == target:
                yield i, data
                target = next(wanted, None)

    # -- listing ----------------------------------------------------------------------------------------------

    def _index(self) -> list[_Member]:
        if self._members is None:
            if self.streamed:
                members = [_Member(key, label, 0, 0, 0) for (key, label), _ in self._stream(keep_bytes=False)]
            else:
                members = [m for shard in range(len(self.shards)) for m in self._index_shard(shard)]
            if self.limit is not None:
                members = members[:self.limit]
            if not members:
                raise AttncacheError(f"--data {self.urls}: no samples")
            self._members = members
        return self._members

    def _index_shard(self, shard: int) -> list[_Member]:
        url = self.shards[shard]
        try:
            with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                return list(self._members_of(tar, shard, url))
        except AttncacheError:
            raise
        except (OSError, tarfile.TarError, ValueError) as exc:  # missing shard, broken tar, unreachable URL
            raise AttncacheError(f"--data {url}: cannot read webdataset shard ({exc})") from exc

    def _members_of(self, tar: tarfile.TarFile, shard: int, url: str):
        groups: dict[str, dict] = {}
        for info in tar:
            match = _KEY_EXT.match(info.name)
            if not info.isfile() or match is None:
                continue
            key, ext = match.groups()
            group = groups.setdefault(key, {"order": len(groups)})
            if ext.lower() in WDS_IMAGE_FIELDS and "image" not in group:
                group["image"] = (info.offset_data, info.size)
            elif ext in WDS_LABEL_FIELDS and "label" not in group and info.size <= MAX_LABEL_BYTES:
                group["label"] = tar.extractfile(info).read()
        for key, group in groups.items():
            if "image" not in group:
                raise AttncacheError(f"--data {url}: sample {key!r} has no image field ({', '.join(WDS_IMAGE_FIELDS)})")
            yield _Member(key, _parse_label(group.get("label"), key, url), shard, *group["image"])

    def _stream(self, keep_bytes: bool = True):
        """((key, label), image bytes) in shard order, reading each shard once (pipe: sources)."""
        import webdataset as wds

        try:
            for n, record in enumerate(wds.WebDataset(self.shards, shardshuffle=False, empty_check=False)):
                if self.limit is not None and n >= self.limit:
                    return
                key = record["__key__"]
                field = next((f for f in WDS_IMAGE_FIELDS if f in record), None)
                if field is None:
                    raise AttncacheError(f"--data {self.urls}: sample {key!r} has no image field")
                label_field = next((f for f in WDS_LABEL_FIELDS if f in record), None)
                label = _parse_label(record[label_field] if label_field else None, key, self.urls)
                yield (key, label), (record[field] if keep_bytes else b"")
        except AttncacheError:
            raise
        except Exception as exc:  # noqa: BLE001 - the pipe's command failed, a broken tar, ...
            raise AttncacheError(f"--data {self.urls}: cannot read webdataset ({exc})") from exc


def _parse_label(raw: bytes | None, key: str, where: str) -> int:
    if raw is None:
        return -1
    try:
        return int(raw.decode().strip())
    except (UnicodeDecodeError, ValueError) as exc:
        raise AttncacheError(f"--data {where}: sample {key!r} has a label that is not an integer") from exc

"""ImageFolder: `root/<class>/<image>` (labels from sorted class folders), or a flat folder of images (no labels)."""

from __future__ import annotations

from pathlib import Path

from ..errors import AttncacheError
from .base import IMAGE_EXTENSIONS, Entry, Source


class FolderSource(Source):
    def __init__(self, root: str | Path, limit: int | None = None, option: str = "data"):
        self.root, self.option = Path(root), option
        if not self.root.is_dir():
            raise AttncacheError(f"`{option}` {root}: no such directory")
        self.description = f"folder:{self.root.name}"
        self.limit = limit
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self._listing: list[tuple[str, int]] | None = None  # listed when first needed: reading by key needs none

    def __getstate__(self):  # a loader worker reads by key: it gets no copy of the listing
        return {**self.__dict__, "_listing": None}

    @property
    def _files(self) -> list[tuple[str, int]]:
        if self._listing is None:
            if self.classes:
                files = [(f"{c}/{f.name}", i) for i, c in enumerate(self.classes)
                         for f in sorted((self.root / c).iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
            else:
                files = [(f.name, -1) for f in sorted(self.root.iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
            if not files:
                raise AttncacheError(f"`{self.option}` {self.root}: no images found ({', '.join(IMAGE_EXTENSIONS)})")
            self._listing = files[:self.limit]
        return self._listing

    def entries(self) -> list[Entry]:
        return [Entry(key, label, self._stamp(key)) for key, label in self._files]

    def _stamp(self, key: str) -> str | None:
        try:
            st = (self.root / key).stat()
        except OSError:
            return None
        return f"{st.st_size}:{st.st_mtime_ns}"

    def where(self, key: str) -> str:
        return str(self.root / key)

    def read_index(self, index: int) -> bytes:
        return self._read(self._files[index][0])

    def read_key(self, key: str) -> bytes:
        return self._read(self._checked_key(key))

    def missing_keys(self, keys):
        return [k for k in keys if not (self.root / self._checked_key(k)).is_file()]

    def _read(self, key: str) -> bytes:
        try:
            return (self.root / key).read_bytes()
        except OSError as exc:
            raise AttncacheError(f"{self.root / key}: cannot read ({exc.strerror})") from exc

    def _checked_key(self, key: str) -> str:
        # Keys come from a cache, which may come from another lab: never let one name a file outside --data.
        parts = key.split("/")
        if key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
            raise AttncacheError(f"cached key {key!r}: not a relative path inside {self.root}")
        return key

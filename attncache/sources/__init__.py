"""Image sources, chosen by the form of `--data`: `demo[:N]`, a directory, or webdataset shards (path or URL)."""

from __future__ import annotations

from pathlib import Path

from ..errors import AttncacheError
from .base import IMAGE_EXTENSIONS, Entry, Sample, Source, describe_image, open_image
from .demo import DEMO_CLASSES, DemoSource
from .folder import FolderSource
from .webdataset import WebDatasetSource

__all__ = ["DEMO_CLASSES", "IMAGE_EXTENSIONS", "DemoSource", "Entry", "FolderSource", "Sample", "Source",
           "WebDatasetSource", "describe_image", "open_image", "open_source"]


def open_source(data: str, split: str = "train", limit: int | None = None, option: str = "data") -> Source:
    """`demo` / `demo:N` (N images per class), a directory, or webdataset shard URL(s); first `limit` samples.
    `option`: the name of the option that gave `data` (`val_data` for a val set): what its errors name."""
    if data == "demo" or data.startswith("demo:"):
        count = data.split(":", 1)[1] if ":" in data else None
        if count is not None and not count.isdigit():
            raise AttncacheError(f"`{option}` {data}: expected demo or demo:N (N images per class)")
        per_class = int(count) if count is not None else (16 if split == "train" else 8)
        return DemoSource(split=split, per_class=per_class, limit=limit)
    is_url = "://" in data or data.startswith("pipe:")
    if is_url or data.endswith(".tar") or "{" in data:
        if not is_url and "{" not in data and not Path(data).is_file():
            raise AttncacheError(f"`{option}` {data}: no such file")
        return WebDatasetSource(data, limit, option)
    path = Path(data)
    if not path.exists():
        raise AttncacheError(f"`{option}` {data}: no such file or directory")
    return FolderSource(path, limit, option)

"""Storage: the format's one definition (format.py), the filesystem layer (fs.py), and a registry of store formats:
`zarr` (Zarr v3, random access) and `wds` (webdataset tar shards, streamable)."""

from .base import StoreReader, StoreWriter
from .fs import CacheFS
from .wds_store import WdsReader, WdsWriter
from .zarr_store import ZarrReader, ZarrWriter

WRITERS: dict[str, type[StoreWriter]] = {"zarr": ZarrWriter, "wds": WdsWriter}
READERS: dict[str, type[StoreReader]] = {"zarr": ZarrReader, "wds": WdsReader}

__all__ = ["READERS", "WRITERS", "CacheFS", "StoreReader", "StoreWriter"]

"""Store registry: `zarr` (random access) and `wds` (sequential streaming tar shards)."""

from .base import StoreReader, StoreWriter
from .wds_store import WdsReader, WdsWriter
from .zarr_store import ZarrReader, ZarrWriter

WRITERS: dict[str, type[StoreWriter]] = {"zarr": ZarrWriter, "wds": WdsWriter}
READERS: dict[str, type[StoreReader]] = {"zarr": ZarrReader, "wds": WdsReader}

__all__ = ["READERS", "WRITERS", "StoreReader", "StoreWriter"]

"""attncache: run a frozen ViT teacher once, cache its attention maps, train students from the cache."""

__version__ = "0.1.0"

from .cache import Cache, CacheItem, open_cache  # noqa: E402
from .errors import AttncacheError, CacheFormatError  # noqa: E402
from .extract import ExtractConfig, extract  # noqa: E402

__all__ = ["AttncacheError", "Cache", "CacheFormatError", "CacheItem", "ExtractConfig", "extract", "open_cache"]

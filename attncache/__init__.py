"""attncache: run a frozen ViT teacher once, cache its attention maps, train students from the cache."""

__version__ = "0.2.0"

from .cache import Cache, CacheItem, open_cache  # noqa: E402
from .errors import AttncacheError, CacheFormatError, RunInterrupted  # noqa: E402
from .extract import ExtractConfig, extract  # noqa: E402
from .teacher import TeacherOptions  # noqa: E402
from .train import TrainConfig, train  # noqa: E402

__all__ = ["AttncacheError", "Cache", "CacheFormatError", "CacheItem", "ExtractConfig", "RunInterrupted",
           "TeacherOptions", "TrainConfig", "extract", "open_cache", "train"]

"""attncache: run a frozen ViT teacher once, cache its attention maps, train students from the cache.

The public API is imported on first use (`attncache.open_cache`, `attncache.ExtractConfig`, ...): `import attncache`
and the modules a DataLoader worker needs stay light (no timm, no model code). The two stages are the subpackages
`attncache.extract` (`extract.extract(ExtractConfig(...))`) and `attncache.train` (`train.train(TrainConfig(...))`).
"""

from importlib import import_module

__version__ = "0.4.0"

_API = {
    "AttncacheError": ".errors", "CacheFormatError": ".errors", "RunInterrupted": ".errors",
    "Cache": ".cache", "CacheItem": ".cache", "open_cache": ".cache",
    "ExtractConfig": ".extract", "TeacherOptions": ".teacher", "TrainConfig": ".train",
    "evaluate_run": ".eval", "verify_cache": ".tools.verify", "copy_cache": ".tools.copy",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name], __name__), name)
    if name in ("extract", "train", "eval", "tools", "cache", "store", "codecs", "sources", "teacher", "views"):
        return import_module(f".{name}", __name__)
    raise AttributeError(f"module 'attncache' has no attribute {name!r}")

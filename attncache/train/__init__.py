"""`attncache train`: students from a cache (or a live teacher). config.py (options), modes.py (the mode table),
student.py, losses.py, maps.py (teacher targets), loader.py (batches), engine.py (the loop), checkpoint.py (the run
directory's files), trainer.py (wiring). Names are imported on first use, so that `attncache.train.loader` (what
DataLoader workers import) does not pull in the model code."""

from importlib import import_module

_API = {"TrainConfig": ".config", "MODES": ".modes", "Mode": ".modes", "Trainer": ".trainer", "train": ".trainer"}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name], __name__), name)
    raise AttributeError(f"module 'attncache.train' has no attribute {name!r}")

"""`attncache train`: students from a cache (or a live teacher). config.py (options), modes.py (the mode table),
student.py, losses.py, maps.py (teacher targets), loader.py (batches), engine.py (the loop), checkpoint.py (the run
directory's files), trainer.py (wiring)."""

from .config import TrainConfig
from .modes import MODES, Mode
from .trainer import Trainer

__all__ = ["MODES", "Mode", "TrainConfig", "Trainer", "train"]


def train(cfg: TrainConfig) -> dict:
    """Run, resume, or (if finished) return the results of a training run."""
    return Trainer(cfg).run()

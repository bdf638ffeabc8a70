"""TensorBoard curves of a run: its metrics.jsonl lines as scalars in RUN/tensorboard/ (rank 0 writes them).

metrics.jsonl stays the source of truth; the event files mirror it, one scalar per number of a line, at the line's
step. A resumed run recomputes the lines after its checkpoint, so events written after the checkpoint would show
those steps twice (and a purge step cannot tell an epoch's train line from its evaluation, both at one step). So
when a run starts or resumes, its event files are rewritten from the lines the metrics log kept (their wall times
kept where the old files have them), and the run goes on appending to the new file.
"""

from __future__ import annotations

import math
from pathlib import Path

EVENTS = "tensorboard"  # RUN/tensorboard/events.out.tfevents.*
TRAIN_TAGS = {"loss": "train/loss", "ce": "train/ce", "transfer": "train/transfer", "lr": "train/lr",
              "images_per_s": "train/images_per_s"}
NOT_A_CURVE = {"val_images"}  # a count, the same every epoch


def scalars(record: dict) -> list[tuple[str, float]]:
    """(tag, value) of a metrics line: train/... for a train window, val/... (val_top1 -> val/top1) for an
    evaluation. Non-finite numbers are left out: the metrics line holds them as null."""
    if record.get("kind") == "train":
        pairs = [(tag, record.get(key)) for key, tag in TRAIN_TAGS.items()]
    elif record.get("kind") == "eval":
        pairs = [(f"val/{key[4:]}", v) for key, v in record.items()
                 if key.startswith("val_") and key not in NOT_A_CURVE]
    else:
        pairs = []
    return [(tag, float(v)) for tag, v in pairs if isinstance(v, int | float) and math.isfinite(v)]


class NoCurves:
    """Curves off (`tensorboard=False`, tensorboard not installed, a rank other than 0): writes nothing."""

    def add(self, record: dict) -> None:
        pass

    def flush(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class Curves(NoCurves):
    def __init__(self, writer, wall_times: dict[tuple[str, int], float] | None = None):
        self.writer, self.wall_times = writer, wall_times or {}

    def add(self, record: dict) -> None:
        step = record["step"]
        for tag, value in scalars(record):
            self.writer.add_scalar(tag, value, step, walltime=self.wall_times.get((tag, step)))

    def flush(self) -> None:
        self.writer.flush()

    def __exit__(self, *exc) -> None:
        self.writer.close()


def open_curves(out: Path, kept: list[dict], say) -> NoCurves:
    """The run's curves, rewritten from `kept` (the metrics lines of the run so far); `say` tells once that they
    are off when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        say("tensorboard is not installed: no TensorBoard curves (pip install 'attncache[tensorboard]'); "
            "metrics.jsonl has every line")
        return NoCurves()
    folder = Path(out) / EVENTS
    old = sorted(folder.glob("events.out.tfevents.*")) if folder.is_dir() else []
    curves = Curves(SummaryWriter(str(folder)), wall_times(old))
    for record in kept:
        curves.add(record)
    curves.flush()
    curves.wall_times = {}  # new lines are timed as they come
    for path in old:  # only now: a kill before this leaves both, and the next start rewrites them again
        path.unlink()
    return curves


def wall_times(paths: list[Path]) -> dict[tuple[str, int], float]:
    """When each (tag, step) scalar of these event files was written (a torn or corrupt tail ends a file)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    times = {}
    for path in paths:
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                times[(value.tag, event.step)] = event.wall_time
    return times

"""Every record's view, drawn from the policy and the samples: what the views table is written from.

A view is a pure function of (policy, samples, row), so a cache's views are the same bytes whoever draws them.
Drawing is Python (an `at-distill` view's RandAugment ops, erase boxes, mixing partner and the partner's own view,
drop-path mask: ~0.3 ms), and rank 0 draws every view before any shard is written: ImageNet's 5.12M views would
be ~27 min on one core while the other ranks wait. So a large cache's views are drawn by a pool of processes, a
span of rows each, and written in row order.
"""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from ..store.format import sample_and_view
from ..store.records import Layout, record_rows
from ..views import View, ViewPolicy

SPAN = 4096  # rows drawn per task (a views-table row is ~250 bytes: ~1 MB sent back per task)
POOL_MIN_RECORDS = 50_000  # below this a pool's start-up (a few seconds) costs more than it saves


class DrawnViews:
    """Every record's view in row order, drawn when asked for: what the tables are written from, and the
    calibration views of a fitted basis."""

    def __init__(self, policy: ViewPolicy, samples, spec):
        self.policy, self.samples, self.spec = policy, samples, spec

    def __len__(self) -> int:
        return len(self.samples) * self.policy.views_per_image

    def __getitem__(self, row: int) -> View:
        index, view = sample_and_view(row, len(self.samples))
        return self.policy.view(self.samples, index, view, self.spec.image_size, mean=self.spec.mean,
                                interpolation=self.spec.interpolation, depth=self.spec.depth)

    def __iter__(self):
        return (self[row] for row in range(len(self)))

    def rows(self, start: int, stop: int, layout: Layout) -> np.ndarray:
        """The views-table rows of records [start, stop)."""
        return record_rows([self[row] for row in range(start, stop)], layout)

    def table_rows(self, layout: Layout, processes: int = 1, pool_min: int = POOL_MIN_RECORDS):
        """Every record's views-table rows, a span at a time in row order; drawn by `processes` worker processes
        when there are at least `pool_min` records."""
        spans = [(start, min(start + SPAN, len(self))) for start in range(0, len(self), SPAN)]
        if processes < 2 or len(self) < pool_min:
            for start, stop in spans:
                yield self.rows(start, stop, layout)
            return
        # forkserver (spawn where there is none): the extracting process holds a teacher and torch's threads,
        # which a fork would copy in an unusable state. Each worker gets the policy and the samples once.
        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(processes, mp_context=mp.get_context(method), initializer=_hold,
                                 initargs=(self, layout)) as pool:
            yield from pool.map(_draw, spans)


_held: tuple[DrawnViews, Layout] | None = None  # a pool worker's views and layout (set by its initializer)


def _hold(drawn: DrawnViews, layout: Layout) -> None:
    global _held
    _held = (drawn, layout)


def _draw(span: tuple[int, int]) -> np.ndarray:
    drawn, layout = _held
    return drawn.rows(*span, layout)

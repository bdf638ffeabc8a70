"""The extraction pipeline: images -> views -> frozen teacher -> codec -> whole shards, three stages overlapped.

Worker threads decode images and render views (a bounded window ahead), the calling thread runs the teacher and
the codec's on-device encoding, one writer thread compresses and writes whole shards (temporary name, then rename)
and drops a completion marker per shard, then has the destination publish the shard (publish.py). The first
error of any stage is raised in the caller.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..codecs import Codec
from ..sources import IMAGE_EXTENSIONS, Source, open_image
from ..store import StoreWriter
from ..store.base import usable_cores
from ..store.format import sample_and_view
from ..teacher import AttentionCapture, TeacherSpec, drop_path_masks
from ..views import View, drop_path_keep, render
from .plan import write_marker

if TYPE_CHECKING:
    from .publish import Destination


@dataclass
class Work:
    """What the pipeline needs to know about the cache being written."""

    out: Path
    spec: TeacherSpec
    source: Source
    samples: list[dict]
    views: list[View]
    per_shard: int
    records: int
    embed_images: bool


def _rendered_rows(work: Work, rows: list[int], pool, window: int) -> Iterator[tuple[int, torch.Tensor, bytes]]:
    """(row, pixels, image bytes) in row order; rendering runs in `pool`, at most `window` rows ahead."""
    n, spec = len(work.samples), work.spec

    def one(row: int, data: bytes, partner_data: bytes | None) -> tuple[int, torch.Tensor, bytes]:
        key, view = work.samples[sample_and_view(row, n)[0]]["key"], work.views[row]
        image = open_image(data, work.source.where(key))
        partner = open_image(partner_data, work.source.where(view.mix.partner)) if view.mix else None
        pixels = render(image, view, spec.image_size, spec.interpolation, spec.mean, spec.std, partner=partner)
        return row, pixels, data

    pending: deque = deque()
    by_sample: dict[int, list[int]] = {}
    for row in rows:
        by_sample.setdefault(sample_and_view(row, n)[0], []).append(row)
    for sample_index, data in work.source.iter_bytes(sorted(by_sample)):
        for row in by_sample[sample_index]:
            mix = work.views[row].mix  # the partner's bytes are read here: sources are not thread-safe
            pending.append(pool.submit(one, row, data, work.source.read_key(mix.partner) if mix else None))
        while len(pending) > window:
            yield pending.popleft().result()
    for fut in pending:
        yield fut.result()


class ShardWriterThread(threading.Thread):
    """Compresses and writes whole shards off the main thread; the first error is re-raised in the caller. A shard
    is durable once its marker is written: then the destination publishes it (publish.py), then `on_shard` hears
    of it."""

    def __init__(self, writer: StoreWriter, out: Path, on_shard: Callable[[int], None] | None,
                 destination: Destination | None = None):
        super().__init__(daemon=True)
        self.writer, self.out, self.on_shard, self.destination = writer, out, on_shard, destination
        self.jobs: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None

    def run(self):
        while (job := self.jobs.get()) is not None:
            if self.error is not None:
                continue
            shard, arrays, metas, images = job
            try:
                arrays = {k: np.stack(v) for k, v in arrays.items()}
                self.writer.write_shard(shard, arrays, metas, images)
                write_marker(self.out, shard, self.writer.shard_paths(shard))
                if self.destination is not None:
                    self.destination.shard_durable(shard)
                if self.on_shard:
                    self.on_shard(shard)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self.error = exc

    def submit(self, job):
        self.check()
        self.jobs.put(job)

    def finish(self):
        self.jobs.put(None)
        self.join()
        self.check()

    def check(self):
        if self.error is not None:
            raise self.error


def image_ext(key: str, data: bytes, where: str) -> str:
    """Tar member extension of an embedded image: the key's own (ImageFolder), else the decoded format's
    (webdataset keys carry no extension, and may contain '/' or '.')."""
    name = key.rsplit("/", 1)[-1]
    if "." in name and f".{name.rsplit('.', 1)[1].lower()}" in IMAGE_EXTENSIONS:
        return name.rsplit(".", 1)[1].lower()
    fmt = (open_image(data, where).format or "").lower()
    return {"jpeg": "jpg", "tiff": "tif"}.get(fmt, fmt) or "img"


def _capture_batch(work: Work, batch: list, capture: AttentionCapture, device: torch.device, autocast):
    """The capture of a batch of rendered rows, each view with the drop-path masks it was drawn with."""
    x = torch.stack([p for _, p, _ in batch]).to(device, non_blocking=True)
    keep, rate = drop_path_keep([work.views[row] for row, _, _ in batch])
    with autocast, drop_path_masks(capture.model, keep, rate):
        return capture(x)


def teacher_autocast(device: torch.device, amp: bool):
    """What `--amp` runs the teacher under: bf16 autocast on CUDA (the capture still forms maps in fp32)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" \
        else contextlib.nullcontext()


def capture_rows(work: Work, rows: list[int], capture: AttentionCapture, *, batch_size: int, workers: int,
                 device: torch.device, amp: bool) -> torch.Tensor:
    """The capture of these rows exactly as the pipeline captures them, stacked on the CPU (calibration)."""
    out = []
    with ThreadPoolExecutor(workers) as pool:
        rendered = list(_rendered_rows(work, rows, pool, 4 * batch_size))
        for i in range(0, len(rendered), batch_size):
            batch = rendered[i:i + batch_size]
            out.append(_capture_batch(work, batch, capture, device, teacher_autocast(device, amp)).cpu())
    return torch.cat(out)


def writer_threads(device: torch.device, render_workers: int) -> int:
    """Threads that compress shards: the cores the teacher leaves free. A CPU teacher's torch threads need theirs
    (more busy threads than cores stall its ops; on 2 cores a pool beside the teacher gained nothing end to end);
    beside an accelerator, every core the render workers leave."""
    busy = torch.get_num_threads() if device.type == "cpu" else render_workers + 1
    return max(1, usable_cores() - busy)


def run_pipeline(work: Work, pending: list[int], capture: AttentionCapture, codec: Codec, writer: StoreWriter, *,
                 batch_size: int, workers: int, device: torch.device, amp: bool, progress: bool,
                 on_shard: Callable[[int], None] | None = None, destination: Destination | None = None) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    n, per_shard, records = len(work.samples), work.per_shard, work.records
    shard_rows = {s: min(per_shard, records - s * per_shard) for s in pending}
    left = dict(shard_rows)  # rows of each shard not yet in a batch
    writer.threads = writer_threads(device, workers)
    writer_thread = ShardWriterThread(writer, work.out, on_shard, destination)
    writer_thread.start()
    buffers: dict[int, list] = {}
    autocast = teacher_autocast(device, amp)

    def flush(batch):
        captured = _capture_batch(work, batch, capture, device, autocast)
        encoded = codec.encode(captured, capture.payload)
        for j, (row, _, data) in enumerate(batch):
            shard = row // per_shard
            s = work.samples[sample_and_view(row, n)[0]]
            meta = {"key": s["key"], "view": row // n, "label": s["label"], "sha256": s["sha256"],
                    **work.views[row].to_json()}
            image = (data, image_ext(s["key"], data, work.source.where(s["key"]))) if work.embed_images else None
            buffers.setdefault(shard, []).append((row, {k: v[j] for k, v in encoded.items()}, meta, image))
            if len(buffers[shard]) == shard_rows[shard]:
                items = sorted(buffers.pop(shard), key=lambda t: t[0])
                arrays = {k: [it[1][k] for it in items] for k in encoded}  # stacked by the writer thread
                images = [it[3] for it in items] if work.embed_images else None
                writer_thread.submit((shard, arrays, [it[2] for it in items], images))
        bar.advance(task, len(batch))

    columns = [TextColumn("extract"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]:.1f} views/s"), TimeRemainingColumn()]
    start = time.perf_counter()
    with Progress(*columns, disable=not progress, transient=False) as bar, ThreadPoolExecutor(workers) as pool:
        task = bar.add_task("extract", total=sum(shard_rows.values()), rate=0.0)
        # Batches never span two shards: a shard's batches (and so its bytes) are the same whichever process
        # writes it, alongside whichever other shards.
        rendered = itertools.chain.from_iterable(
            _rendered_rows(work, list(range(s * per_shard, s * per_shard + shard_rows[s])), pool, 4 * batch_size)
            for s in pending)
        batch: list = []
        try:
            for item in rendered:
                batch.append(item)
                left[item[0] // per_shard] -= 1
                if len(batch) == batch_size or left[item[0] // per_shard] == 0:
                    flush(batch)
                    batch = []
                    bar.update(task, rate=bar.tasks[0].completed / max(1e-9, time.perf_counter() - start))
        finally:
            writer_thread.finish()

"""The precompute loop: images -> views -> frozen teacher -> codec -> store, resumable and pipelined.

Order of work, cheapest checks first: options, teacher, source scan (every image decoded once: a corrupt file is
named before the teacher runs), `--out` consistency, then shards. Three stages overlap: worker threads render the
views, the main thread runs the teacher and the codec's on-device encoding, one writer thread compresses and
writes whole shards (temporary name, then rename) and drops a completion marker. The manifest is written last.
"""

from __future__ import annotations

import contextlib
import json
import math
import queue
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .capture import PAYLOADS, AttentionCapture, parse_layers
from .codecs import Codec, get_codec
from .data import IMAGE_EXTENSIONS, open_image, open_source
from .errors import AttncacheError
from .store import WRITERS
from .store.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    PLAN,
    PROGRESS_DIR,
    SAMPLES,
    STORE_FORMATS,
    VIEWS,
    atomic_write_json,
    canonical_json,
    dataset_fingerprint,
    file_entry,
    file_intact,
    sample_and_view,
    validate_manifest,
    write_jsonl,
)
from .teachers import build_teacher
from .views import View, ViewPolicy, render

TARGET_SHARD_BYTES = 256 << 20  # raw bytes per shard before compression; webdataset's usual 100 MB-1 GB range


@dataclass
class ExtractConfig:
    teacher: str
    data: str
    out: str
    format: str = "zarr"
    views: int = 1
    split: str = "train"
    layers: str = "all"
    payload: str | None = None  # None: the codec's default (probs for fp16, qk for qk/lowrank, logits for cls)
    codec: str = "fp16"
    codec_params: dict = field(default_factory=dict)
    batch_size: int = 32
    device: str = "cpu"
    weights: str | None = None
    pretrained: bool = True
    image_size: int | None = None
    teacher_args: dict = field(default_factory=dict)
    seed: int = 0
    records_per_shard: int | None = None
    embed_images: bool = False
    workers: int = 2
    limit: int | None = None  # only the first N images (smoke runs, benchmarks)
    amp: bool = False  # bf16 autocast for the teacher on CUDA; maps are still formed in fp32
    progress: bool = True


def extract(cfg: ExtractConfig, on_shard: Callable[[int], None] | None = None, stats: dict | None = None) -> dict:
    """Run (or resume) an extraction; returns the manifest.

    `on_shard(i)` is called after shard i is durable; `stats`, if given, receives the pipeline's wall time and
    the number of records it processed (for benchmarks).
    """
    codec = _check_options(cfg)
    payload = cfg.payload or codec.payloads[0]
    out = Path(cfg.out)
    _check_out_is_free(out)
    model, spec = build_teacher(cfg.teacher, image_size=cfg.image_size, weights=cfg.weights,
                                pretrained=cfg.pretrained, teacher_args=cfg.teacher_args, device=cfg.device)
    layers = parse_layers(cfg.layers, spec.depth)
    policy = ViewPolicy(split=cfg.split, views_per_image=cfg.views, seed=cfg.seed,
                        crop_pct=spec.crop_pct if cfg.split == "val" else 0.875)

    source = open_source(cfg.data, cfg.split, cfg.limit)
    _log(cfg, f"scanning {source.description} ...")
    samples = [s.to_json() for s in source.scan()]
    views = [View.from_json(v) for v in _draw_all_views(policy, samples)]

    shape = spec.capture_shape(len(layers))
    fields = codec.fields(shape)
    records = len(samples) * policy.views_per_image
    per_shard = cfg.records_per_shard or _default_records_per_shard(sum(f.nbytes for f in fields.values()))
    plan = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "teacher": spec.to_json(),
        "capture": {"layers": layers, "payload": payload, "map_shape": list(shape.map_shape), "dtype": "float32"},
        "codec": {**codec.to_json(), "fields": {k: v.to_json() for k, v in fields.items()}},
        "views": policy.to_json(),
        "dataset": {"num_samples": len(samples), "fingerprint": dataset_fingerprint(samples),
                    "classes": source.classes, "source": source.description},
        "store": {"format": cfg.format, "records": records, "records_per_shard": min(per_shard, records),
                  "embed_images": cfg.embed_images},
    }
    _check_same_plan(out, plan)
    if (finished := _finished_manifest(out)) is not None:  # same plan, every file intact: nothing to do
        if stats is not None:
            stats.update(pipeline_s=0.0, records=0)
        return finished
    _claim_out(out, plan)
    write_jsonl(out / SAMPLES, samples)
    write_jsonl(out / VIEWS, [_view_record(r, len(samples), views[r]) for r in range(records)])

    per_shard = plan["store"]["records_per_shard"]
    writer = WRITERS[cfg.format](out, fields, codec.compressor(), records, per_shard, cfg.embed_images)
    num_shards = math.ceil(records / per_shard)
    pending = [s for s in range(num_shards) if not _shard_done(out, s, writer.shard_paths(s))]
    _log(cfg, f"{records} records in {num_shards} shards, {num_shards - len(pending)} already complete")

    start = time.perf_counter()
    if pending:
        capture = AttentionCapture(model, layers, payload)
        _run_pipeline(cfg, spec, source, samples, views, pending, per_shard, records, capture, codec, writer,
                      on_shard)
    if stats is not None:
        stats.update(pipeline_s=time.perf_counter() - start, records=sum(
            min(per_shard, records - s * per_shard) for s in pending))

    manifest = {
        **plan,
        "created_by": f"attncache {__version__}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "store": {**plan["store"],
                  "shards": [_shard_entry(out, s, per_shard, records) for s in range(num_shards)],
                  "metadata_files": [file_entry(out, p) for p in writer.metadata_paths()]},
        "files": {SAMPLES: file_entry(out, SAMPLES), VIEWS: file_entry(out, VIEWS)},
    }
    validate_manifest(manifest)
    atomic_write_json(out / MANIFEST, manifest)
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)  # a finished cache carries no resume state
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# checks and plan


def _check_options(cfg: ExtractConfig) -> Codec:
    if cfg.format not in STORE_FORMATS:
        raise AttncacheError(f"--format {cfg.format!r}: expected one of {STORE_FORMATS}")
    if cfg.embed_images and cfg.format != "wds":
        raise AttncacheError("--embed-images needs --format wds (a zarr cache joins images by key)")
    if cfg.batch_size < 1:
        raise AttncacheError(f"--batch-size {cfg.batch_size}: must be >= 1")
    if cfg.records_per_shard is not None and cfg.records_per_shard < 1:
        raise AttncacheError(f"--shard-records {cfg.records_per_shard}: must be >= 1")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise AttncacheError(f"--device {cfg.device}: CUDA is not available on this machine")
    codec = get_codec(cfg.codec, **cfg.codec_params)
    if cfg.payload is not None and cfg.payload not in PAYLOADS:
        raise AttncacheError(f"--payload {cfg.payload!r}: expected one of {PAYLOADS}")
    if cfg.payload is not None and cfg.payload not in codec.payloads:
        raise AttncacheError(f"--codec {cfg.codec} encodes payload {' or '.join(codec.payloads)}, "
                             f"not --payload {cfg.payload}")
    return codec


def _default_records_per_shard(record_bytes: int) -> int:
    return int(max(1, min(4096, TARGET_SHARD_BYTES // max(1, record_bytes))))


def _draw_all_views(policy: ViewPolicy, samples: list[dict]) -> list[dict]:
    """All records' view parameters in row order (view-major)."""
    per_sample = [policy.draw(s["key"], s["width"], s["height"]) for s in samples]
    return [per_sample[i][v].to_json() for v in range(policy.views_per_image) for i in range(len(samples))]


def _check_out_is_free(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise AttncacheError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / PLAN).exists() and not (out / MANIFEST).exists():
        raise AttncacheError(f"--out {out}: directory is not empty and holds no attncache cache")


def _check_same_plan(out: Path, plan: dict) -> None:
    """An existing (partial or complete) cache in `out` must have been made by the same plan."""
    existing = None
    for name in (PLAN, MANIFEST):
        if (out / name).exists():
            try:
                existing = json.loads((out / name).read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise AttncacheError(f"--out {out}: unreadable {name} ({exc})") from exc
            break
    if existing is None:
        return
    # A finished manifest adds shard lists and timestamps: compare only what the plan decides.
    old = {k: existing.get(k) for k in plan}
    old["store"] = {k: (existing.get("store") or {}).get(k) for k in plan["store"]}
    if k := next((k for k in plan if canonical_json(old[k]) != canonical_json(plan[k])), None):
        detail = f": {old[k]} vs {plan[k]}" if k == "store" else ""
        raise AttncacheError(f"--out {out}: holds a different cache ({k} differs{detail}); choose another --out")


def _claim_out(out: Path, plan: dict) -> None:
    """Record the plan for resumption. A damaged finished cache is reopened: its manifest's shard entries become
    completion markers again (intact shards are kept) and the manifest goes until the repair is complete."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / PLAN, plan)
    if (out / MANIFEST).exists():
        for shard in json.loads((out / MANIFEST).read_text())["store"]["shards"]:
            if not _marker(out, shard["index"]).exists():
                atomic_write_json(_marker(out, shard["index"]), {"files": shard["files"]})
        (out / MANIFEST).unlink()


def _finished_manifest(out: Path) -> dict | None:
    """The manifest of a finished cache (whose plan `_claim_out` matched) if every file it lists is intact."""
    if not (out / MANIFEST).exists():
        return None
    try:
        manifest = validate_manifest(json.loads((out / MANIFEST).read_text()))
    except (OSError, json.JSONDecodeError, AttncacheError):
        return None
    store = manifest["store"]
    entries = [f for s in store["shards"] for f in s["files"]] + store.get("metadata_files", [])
    entries += list(manifest["files"].values())
    return manifest if all(file_intact(out, f) for f in entries) else None


def _marker(out: Path, shard: int) -> Path:
    return out / PROGRESS_DIR / f"shard-{shard:06d}.json"


def _shard_done(out: Path, shard: int, paths: list[str]) -> bool:
    """A shard is complete when its marker exists and every file it names still has the recorded size and hash."""
    marker = _marker(out, shard)
    if not marker.exists():
        return False
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, json.JSONDecodeError, KeyError):
        return False
    if sorted(f["path"] for f in files) != sorted(paths):
        return False
    return all(file_intact(out, f) for f in files)


def _shard_entry(out: Path, shard: int, per_shard: int, records: int) -> dict:
    files = json.loads(_marker(out, shard).read_text())["files"]
    first = shard * per_shard
    return {"index": shard, "first_record": first, "records": min(per_shard, records - first), "files": files}


def _image_ext(key: str, data: bytes) -> str:
    """Tar member extension of an embedded image: the key's own (ImageFolder), else the decoded format's
    (webdataset keys carry no extension, and may contain '/' or '.')."""
    name = key.rsplit("/", 1)[-1]
    if "." in name and f".{name.rsplit('.', 1)[1].lower()}" in IMAGE_EXTENSIONS:
        return name.rsplit(".", 1)[1].lower()
    fmt = (open_image(data, key).format or "").lower()
    return {"jpeg": "jpg", "tiff": "tif"}.get(fmt, fmt) or "img"


def _view_record(row: int, num_samples: int, view: View) -> dict:
    sample_index, view_index = sample_and_view(row, num_samples)
    return {"sample": sample_index, "view": view_index, **view.to_json()}


def _log(cfg: ExtractConfig, msg: str) -> None:
    if cfg.progress:
        from rich.console import Console

        Console(stderr=True).print(f"attncache: {msg}", markup=False, highlight=False, emoji=False)


# ---------------------------------------------------------------------------------------------------------------
# the pipeline


def _rendered_rows(cfg, spec, source, samples, views, rows, pool) -> Iterator[tuple[int, torch.Tensor, bytes]]:
    """(row, pixels, image bytes) in row order; rendering runs in `pool`, a bounded number of rows ahead."""
    num_samples = len(samples)

    def work(row: int, data: bytes) -> tuple[int, torch.Tensor, bytes]:
        key = samples[sample_and_view(row, num_samples)[0]]["key"]
        image = open_image(data, f"{source.description}:{key}")
        return row, render(image, views[row], spec.image_size, spec.interpolation, spec.mean, spec.std), data

    window: deque = deque()
    by_sample: dict[int, list[int]] = {}
    for row in rows:
        by_sample.setdefault(sample_and_view(row, num_samples)[0], []).append(row)
    for sample_index, data in source.iter_bytes(sorted(by_sample)):
        for row in by_sample[sample_index]:
            window.append(pool.submit(work, row, data))
        while len(window) > 4 * cfg.batch_size:
            yield window.popleft().result()
    for fut in window:
        yield fut.result()


class _ShardWriterThread(threading.Thread):
    """Compresses and writes whole shards off the main thread; the first error is re-raised in the caller."""

    def __init__(self, writer, out: Path, on_shard):
        super().__init__(daemon=True)
        self.writer, self.out, self.on_shard = writer, out, on_shard
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
                files = [file_entry(self.out, p) for p in self.writer.shard_paths(shard)]
                atomic_write_json(_marker(self.out, shard), {"files": files})
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


def _run_pipeline(cfg, spec, source, samples, views, pending, per_shard, records, capture, codec, writer, on_shard):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    num_samples = len(samples)
    rows = [r for s in pending for r in range(s * per_shard, min(records, (s + 1) * per_shard))]
    shard_rows = {s: min(per_shard, records - s * per_shard) for s in pending}
    writer_thread = _ShardWriterThread(writer, Path(cfg.out), on_shard)
    writer_thread.start()
    buffers: dict[int, list] = {}
    device = torch.device(cfg.device)
    use_amp = cfg.amp and device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()

    def flush_batch(batch):
        row_ids = [r for r, _, _ in batch]
        x = torch.stack([p for _, p, _ in batch]).to(device, non_blocking=True)
        with autocast:
            maps = capture(x)
        encoded = codec.encode(maps, capture.payload)
        for j, row in enumerate(row_ids):
            shard = row // per_shard
            sample_index, view = sample_and_view(row, num_samples)
            s = samples[sample_index]
            meta = {"key": s["key"], "view": view, "label": s["label"], "sha256": s["sha256"],
                    **views[row].to_json()}
            image = (batch[j][2], _image_ext(s["key"], batch[j][2])) if cfg.embed_images else None
            buffers.setdefault(shard, []).append((row, {k: v[j] for k, v in encoded.items()}, meta, image))
            if len(buffers[shard]) == shard_rows[shard]:
                items = sorted(buffers.pop(shard), key=lambda t: t[0])
                arrays = {k: [it[1][k] for it in items] for k in encoded}  # stacked by the writer thread
                images = [it[3] for it in items] if cfg.embed_images else None
                writer_thread.submit((shard, arrays, [it[2] for it in items], images))
        progress.advance(task, len(batch))

    columns = [TextColumn("extract"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]:.1f} views/s"), TimeRemainingColumn()]
    start = time.perf_counter()
    with Progress(*columns, disable=not cfg.progress, transient=False) as progress, \
            ThreadPoolExecutor(max(1, cfg.workers)) as pool:
        task = progress.add_task("extract", total=len(rows), rate=0.0)
        batch: list = []
        try:
            for item in _rendered_rows(cfg, spec, source, samples, views, rows, pool):
                batch.append(item)
                if len(batch) == cfg.batch_size:
                    flush_batch(batch)
                    batch = []
                    done = progress.tasks[0].completed
                    progress.update(task, rate=done / max(1e-9, time.perf_counter() - start))
            if batch:
                flush_batch(batch)
        finally:
            writer_thread.finish()

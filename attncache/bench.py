"""Measurements behind `attncache bench`: rates of the extraction stages, measured in one run on one device.

Extraction overlaps the teacher with encoding and writing, so its ideal rate is bounded by
  min(teacher, encode+write)              when they run on separate resources (GPU teacher, CPU compressor);
  1 / (1/teacher + 1/encode+write)        when they share the same CPU cores.
`efficiency` = measured extraction rate / that bound (the goal is >= 0.85).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .capture import AttentionCapture, parse_layers
from .codecs import get_codec
from .data import open_image, open_source
from .extract import ExtractConfig, extract
from .store import WRITERS
from .teachers import build_teacher
from .views import ViewPolicy, render


@dataclass
class ExtractBench:
    teacher: str = "demo"
    data: str = "demo"
    out: str = "bench_out"
    batch_size: int = 32
    device: str = "cpu"
    weights: str | None = None
    image_size: int | None = None
    teacher_args: dict = field(default_factory=dict)
    format: str = "zarr"
    codec: str = "fp16"
    layers: str = "all"
    limit: int | None = None
    views: int = 4  # views per image: more records per run, closer to the steady state
    repeats: int = 3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_rate(fn, n: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n / best


def bench_extract(b: ExtractBench) -> dict:
    device = torch.device(b.device)
    model, spec = build_teacher(b.teacher, image_size=b.image_size, weights=b.weights,
                                pretrained=b.weights is None, teacher_args=b.teacher_args, device=device)
    layers = parse_layers(b.layers, spec.depth)
    source = open_source(b.data, limit=b.limit)
    samples = source.scan()
    policy = ViewPolicy(views_per_image=b.views)
    images = dict(source.iter_bytes(range(len(samples))))
    pixels = torch.stack([render(open_image(images[i], s.key), view, spec.image_size, spec.interpolation,
                                 spec.mean, spec.std)
                          for v in range(b.views) for i, s in enumerate(samples)
                          for view in [policy.draw(s.key, s.width, s.height)[v]]])
    batches = [pixels[i:i + b.batch_size].to(device) for i in range(0, len(pixels), b.batch_size)]
    n = len(pixels)

    @torch.no_grad()
    def teacher_only():
        for x in batches:
            model.forward_features(x)
        _sync(device)

    capture = AttentionCapture(model, layers, "probs")

    def teacher_capture():
        for x in batches:
            capture(x)
        _sync(device)

    teacher_only()  # warm-up
    teacher_rate = _best_rate(teacher_only, n, b.repeats)
    capture_rate = _best_rate(teacher_capture, n, b.repeats)

    # encode + write alone, from maps already in memory
    codec = get_codec(b.codec)
    payload = codec.payloads[0]
    codec_capture = AttentionCapture(model, layers, payload)
    maps = [codec_capture(x).cpu() for x in batches]
    fields = codec.fields(spec.capture_shape(len(layers)))
    work = Path(tempfile.mkdtemp(prefix="attncache-bench-"))

    stored_bytes: list[int] = []

    def encode_write():
        root = work / f"ew-{time.perf_counter_ns()}"
        writer = WRITERS[b.format](root, fields, codec.compressor(), n, b.batch_size)
        for i, m in enumerate(maps):
            writer.write_shard(i, codec.encode(m, payload), [{}] * len(m))
        stored_bytes.append(sum((root / p).stat().st_size for i in range(len(maps)) for p in writer.shard_paths(i)))
        shutil.rmtree(root)

    encode_write_rate = _best_rate(encode_write, n, b.repeats)
    stored = stored_bytes[0] / n

    # the full pipeline (views rendered from source bytes, teacher, encode, write), as `attncache extract` runs it
    best = 0.0
    for r in range(b.repeats):
        stats: dict = {}
        out = Path(b.out) / f"extract-{r}"
        shutil.rmtree(out, ignore_errors=True)
        extract(ExtractConfig(teacher=b.teacher, data=b.data, out=str(out), format=b.format, codec=b.codec,
                              views=b.views,
                              layers=b.layers, batch_size=b.batch_size, device=b.device, weights=b.weights,
                              pretrained=b.weights is None, image_size=b.image_size, teacher_args=b.teacher_args,
                              records_per_shard=b.batch_size, progress=False,
                              limit=b.limit), stats=stats)
        best = max(best, stats["records"] / stats["pipeline_s"])
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)

    shared = device.type == "cpu"
    bound = 1 / (1 / teacher_rate + 1 / encode_write_rate) if shared else min(teacher_rate, encode_write_rate)
    raw = int(np.prod(spec.capture_shape(len(layers)).map_shape)) * 2
    return {
        "device": _device_name(device),
        "teacher": spec.model, "tokens": spec.num_tokens, "layers": len(layers), "views": n,
        "batch_size": b.batch_size, "format": b.format, "codec": b.codec,
        "teacher_views_per_s": round(teacher_rate, 2),
        "teacher_with_capture_views_per_s": round(capture_rate, 2),
        "encode_write_views_per_s": round(encode_write_rate, 2),
        "extract_views_per_s": round(best, 2),
        "bound_rule": "harmonic (shared CPU cores)" if shared else "min (GPU teacher, CPU encoder)",
        "bound_views_per_s": round(bound, 2),
        "efficiency": round(best / bound, 3),
        "extract_vs_plain_inference": round(best / teacher_rate, 3),
        "raw_fp16_bytes_per_view": raw,
        "stored_bytes_per_view": round(stored, 1),
        "ratio_vs_raw_fp16": round(raw / stored, 3),
    }


# ---------------------------------------------------------------------------------------------------------------
# training from a cache
#
# Cached training overlaps reading (worker processes: read, decompress, render) with the student's step (main
# process: decode on the device, forward, backward). Its ideal rate is min(student-only, read+decode); the goal is
# cached >= 0.9 x ideal. The live-teacher rate (same student, same views, maps from the teacher) is the baseline.


@dataclass
class TrainBench:
    cache: str
    data: str | None = None
    out: str = "bench_out/train"
    teacher: str | None = None  # live-teacher baseline; default: the cache's teacher architecture
    weights: str | None = None
    mode: str = "copy"
    layers: str | None = None
    batch_size: int = 16
    steps: int = 20
    warmup: int = 3
    workers: int = 2
    device: str = "cpu"


def bench_train(b: TrainBench) -> dict:
    from .cache import open_cache
    from .loader import batches, make_loader
    from .train import TrainConfig, Trainer

    out, device = Path(b.out), torch.device(b.device)
    shutil.rmtree(out, ignore_errors=True)
    cache = open_cache(b.cache)
    common = dict(mode=b.mode, cache=b.cache, data=b.data, layers=b.layers,
                  batch_size=b.batch_size, workers=b.workers, device=b.device, progress=False)
    cached = Trainer(TrainConfig(out=str(out / "cached"), **common), evaluate=False)
    live = Trainer(TrainConfig(out=str(out / "live"), teacher=b.teacher or cache.teacher.model, weights=b.weights,
                               pretrained=b.weights is None, **common), evaluate=False)
    for trainer in (cached, live):
        trainer.optimizer, trainer.ema = trainer._optimizer(), None

    def timed(loader, work) -> float:
        """images/s of `work(batch)` over `steps` batches after `warmup`, across epochs if needed."""
        done, images, start = 0, 0, None
        while True:
            for batch in batches(loader):
                if done == b.warmup:
                    _sync(device)
                    start, images = time.perf_counter(), 0
                work(batch)
                done += 1
                images += len(batch["labels"])
                if done == b.warmup + b.steps:
                    _sync(device)
                    return images / (time.perf_counter() - start)

    def loader(trainer):
        return make_loader(trainer.train_stream, b.workers, pin_memory=b.device.startswith("cuda"))

    # read + decode alone: the loader's workers and the on-device decode, no student
    read_rate = timed(loader(cached), lambda batch: cached.to_device(batch))
    # student alone: one batch staged on the device, maps decoded once
    stream = cached.train_stream
    images, labels, targets = cached.to_device(stream.load(0, stream.plan(0)[0]))
    staged = {"labels": labels}
    student_rate = timed(_repeat(staged, b.warmup + b.steps),
                         lambda _: cached.optimize(images, labels, targets, cached.cfg.lr))
    cached_rate = timed(loader(cached), lambda batch: cached.train_step(batch, cached.cfg.lr))
    live_rate = timed(loader(live), lambda batch: live.train_step(batch, live.cfg.lr))
    ideal = min(student_rate, read_rate)
    s = cache.summary()
    return {
        "device": _device_name(device), "mode": b.mode, "teacher": s["teacher"], "tokens": s["tokens"],
        "layers": cached.layers, "codec": s["codec"], "store": s["store"], "batch_size": b.batch_size,
        "workers": b.workers, "steps": b.steps, "torch_threads": torch.get_num_threads(),
        "images_per_s": {"cached": cached_rate, "live_teacher": live_rate, "student_only": student_rate,
                         "read_decode": read_rate},
        "ideal_cached": ideal, "cached_vs_ideal": cached_rate / ideal, "cached_vs_live": cached_rate / live_rate,
    }


class _repeat:
    """A stand-in loader that hands out the same staged batch (student-only rate)."""

    def __init__(self, batch: dict, n: int):
        self.batch, self.n = batch, n

    def __iter__(self):
        return iter([self.batch] * self.n)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"

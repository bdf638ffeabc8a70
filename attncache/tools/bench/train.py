"""`attncache bench train`: images/s of training from a cache against training from the live teacher, of the
student alone and of the reader alone, with the ms of the decode and of the teacher's forward, in one run.

Cached training overlaps reading (worker processes: read, decompress, render) with the student's step (main
process: decode on the device, forward, backward). Its ideal rate is min(student-only, read+decode); the goal is
cached >= 0.9 x ideal. The live-teacher rate (same student, same views, maps from the teacher) is the baseline:
a live step costs the teacher's forward T_teacher on top of the student's T_student, so cached / live can reach
(T_teacher + T_student) / T_student (`live_cost_vs_student`), both T measured on a batch staged on the device.
The cached and the live engine run one after the other, so each one's peak device memory is its own.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, replace

import torch

from ...device import parse_device
from ...teacher import TeacherOptions
from .common import BenchDir, device_name, sync, timed_best


@dataclass
class TrainBench:
    cache: str
    data: str | None = None
    out: str = "bench_out/train"
    teacher: TeacherOptions | None = None  # live-teacher baseline; default: the cache's architecture, hub weights
    mode: str = "copy"
    layers: str | None = None
    batch_size: int = 16
    steps: int = 20
    warmup: int = 3
    workers: int = 2
    device: str = "cpu"
    repeats: int = 3  # timed windows per rate; the best is reported (as for extraction)


def bench_train(b: TrainBench) -> dict:
    from ...cache import open_cache

    device = parse_device(b.device)
    cache = open_cache(b.cache)
    teacher = replace(b.teacher or TeacherOptions(), name=(b.teacher and b.teacher.name) or cache.teacher.model)
    work = BenchDir(b.out, "bench_train.json", ("cached", "live"))
    common = dict(mode=b.mode, cache=b.cache, data=b.data, layers=b.layers,
                  batch_size=b.batch_size, workers=b.workers, device=b.device, progress=False)
    cached = _measure_engine(b, device, dict(out=str(work.fresh("cached")), **common), "cached")
    _release(device)
    live = _measure_engine(b, device, dict(out=str(work.fresh("live")), teacher=teacher, **common), "live")
    _release(device)
    rates = {"cached": cached["rate"], "live_teacher": live["rate"], "student_only": cached["student_rate"],
             "read_decode": cached["read_rate"]}
    ideal = min(rates["student_only"], rates["read_decode"])
    student_ms, cached_ms = 1e3 * b.batch_size / rates["student_only"], 1e3 * b.batch_size / rates["cached"]
    s = cache.summary()
    result = {
        "device": device_name(device), "mode": b.mode, "teacher": s["teacher"], "tokens": s["tokens"],
        "layers": cached["layers"], "codec": s["codec"], "store": s["store"], "batch_size": b.batch_size,
        "workers": b.workers, "steps": b.steps, "torch_threads": torch.get_num_threads(),
        "images_per_s": rates,
        "ideal_cached": ideal, "cached_vs_ideal": rates["cached"] / ideal,
        "cached_vs_live": rates["cached"] / rates["live_teacher"],
        "cached_vs_student_only": rates["cached"] / rates["student_only"],
        "ms_per_batch": {"student_step": student_ms, "cached_step": cached_ms, "decode": cached["maps_ms"],
                         "teacher_forward": live["maps_ms"]},
        "decode_share_of_cached_step": cached["maps_ms"] / cached_ms,
        "live_cost_vs_student": (live["maps_ms"] + student_ms) / student_ms,
        "peak_device_bytes": {"cached": cached["peak"], "live": live["peak"]} if device.type == "cuda" else None,
    }
    work.finish(result)
    return result


def _measure_engine(b: TrainBench, device: torch.device, options: dict, kind: str) -> dict:
    """Images/s of one engine's training steps fed by its loader, its peak device memory in them, and the ms of
    its targets on a batch staged on the device (the cache's decode, or the live teacher's forward). The cached
    engine also gives the reader's rate (read + decode, no student) and the student's alone (a staged batch)."""
    from ...train import TrainConfig, Trainer
    from ...train.loader import batches, make_loader

    def timed(loader, step, warmup: int) -> float:
        """Best images/s of `step(batch)` over `repeats` windows of `steps` batches, after `warmup` batches, across
        epochs if needed (one noisy window would make the ratios below exceed what is possible)."""
        rates, done, images, start = [], 0, 0, None
        while True:
            for batch in batches(loader):
                if done >= warmup and (done - warmup) % b.steps == 0:
                    sync(device)
                    if start is not None:
                        rates.append(images / (time.perf_counter() - start))
                        if len(rates) == b.repeats:
                            return max(rates)
                    start, images = time.perf_counter(), 0
                step(batch)
                done += 1
                images += len(batch["labels"])

    engine = Trainer(TrainConfig(**options), evaluate=False).engine
    engine.init_state()
    out = {"layers": engine.layers, **_on_a_staged_batch(b, device, engine, timed, kind == "cached")}
    # One loader for both loader-fed rates (its workers persist). They start together, so their first batches
    # arrive in one burst that the steady state never sees: loader-fed rates skip one batch per worker more.
    loader = make_loader(engine.train_stream, b.workers, pin_memory=device.type == "cuda")
    fed = b.warmup + b.workers
    if kind == "cached":  # read + decode alone: the loader's workers and the on-device decode, no student
        out["read_rate"] = timed(loader, lambda batch: engine.to_device(batch), fed)
    _reset_peak(device)
    out["rate"] = timed(loader, lambda batch: engine.train_step(batch, engine.cfg.lr), fed)
    out["peak"] = _peak(device)
    return out


def _on_a_staged_batch(b: TrainBench, device: torch.device, engine, timed, student: bool) -> dict:
    """On the epoch's first batch, already on the device: ms of the engine's targets (the cache's decode, or the
    live teacher's forward) and, with `student`, the student's images/s alone (maps decoded once)."""
    first = engine.train_stream.load(0, engine.train_stream.plan(0)[0])
    staged = {**first, "fields": {k: v.to(device) for k, v in first["fields"].items()}}
    images = first["images"].to(device)
    out = {"maps_ms": 0.0 if engine.maps is None else  # a mode without teacher targets
           _ms_per_call(lambda: engine.maps(staged, images), device, b.steps, b.repeats)}
    if student:
        _, labels, targets = engine.to_device(staged)
        out["student_rate"] = timed(_repeat({"labels": labels}, b.warmup + b.steps * b.repeats + 1),
                                    lambda _: engine.optimize(images, labels, targets, engine.cfg.lr), b.warmup)
    return out


def _ms_per_call(fn, device: torch.device, calls: int, repeats: int) -> float:
    """Milliseconds per call of `fn` on `device`, best of `repeats` runs of `calls` calls, after one warm-up call."""
    fn()
    sync(device)

    def run():
        for _ in range(calls):
            fn()
        sync(device)

    return 1e3 * timed_best(run, repeats)[1] / calls


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _release(device: torch.device) -> None:
    """Free what an engine left on the device (its model, optimizer state, loaders' pinned batches)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _repeat:
    """A stand-in loader that hands out the same staged batch (student-only rate)."""

    def __init__(self, batch: dict, n: int):
        self.batch, self.n = batch, n

    def __iter__(self):
        return iter([self.batch] * self.n)

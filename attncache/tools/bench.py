"""Measurements behind `attncache bench`: rates and sizes, each measured in one run on one device.

Extraction overlaps the teacher (with capture) and the encode+write stage, so its rate is at most
  min(teacher+capture, encode+write)          (`bound`: no pipeline beats its slowest stage), and it reaches about
  1 / (1/(teacher+capture) + 1/encode+write)  (`serial`) when both stages share the same CPU cores.
`efficiency` = extract / bound (at most 1, up to timing noise); `extract_vs_plain_inference` compares with the teacher
as a user runs it: a fresh timm model, fused attention, no hooks.
"""

from __future__ import annotations

import gc
import itertools
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numcodecs
import numpy as np
import torch

from ..codecs import get_codec
from ..codecs.inputs_klt import fit_basis
from ..device import parse_device
from ..errors import AttncacheError
from ..extract import ExtractConfig, extract
from ..extract.pipeline import teacher_autocast  # what `extract --amp` runs its teacher under
from ..files import atomic_write_json
from ..sources import open_image, open_source
from ..store import WRITERS
from ..teacher import AttentionCapture, TeacherOptions, parse_kwargs, parse_layers
from ..teacher.projections import from_model
from ..views import ViewPolicy, render


@dataclass
class ExtractBench:
    teacher: TeacherOptions = field(default_factory=lambda: TeacherOptions("demo"))
    data: str = "demo"
    out: str = "bench_out"
    batch_size: int = 32
    device: str = "cpu"
    format: str = "zarr"
    codec: str = "fp16"
    codec_params: dict = field(default_factory=dict)
    layers: str = "all"
    limit: int | None = None
    views: int = 4  # views per image: more records per run, closer to the steady state
    repeats: int = 3
    amp: bool = False  # bf16 autocast for the teacher on CUDA (`extract --amp`), the plain baseline's too
    workers: int = ExtractConfig.workers  # render threads, of `extract` and of the inference-from-source baseline
    pipeline_repeats: int | None = None  # passes of encode+write and of the whole pipeline (default: repeats)
    keep_cache: bool = False  # keep the last pipeline pass's cache (OUT/extract, named in the result)


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


def _view_renderer(source, spec, views: int):
    """(jobs, render): one (image index, view) job per training view of every image of `source` (view-major, as a
    cache stores them), and `render(job, image bytes)` -> that view's pixels at the teacher's geometry."""
    samples = source.scan()
    policy = ViewPolicy(views_per_image=views)
    drawn = [policy.draw(s.key, s.width, s.height, spec.image_size) for s in samples]

    def one(job: tuple[int, int], data: bytes) -> torch.Tensor:
        i, v = job
        return render(open_image(data, samples[i].key), drawn[i][v], spec.image_size, spec.interpolation,
                      spec.mean, spec.std)

    return [(i, v) for v in range(views) for i in range(len(samples))], one


def rendered_views(source, spec, views: int) -> torch.Tensor:
    """`views` training views of every image of `source`, rendered at the teacher's geometry."""
    jobs, one = _view_renderer(source, spec, views)
    images = dict(source.iter_bytes(range(len(jobs) // views)))
    return torch.stack([one(job, images[job[0]]) for job in jobs])


class BenchDir:
    """A benchmark's scratch directory: created empty, or one this benchmark made before (it holds the marker
    file); anything else is refused, and only the benchmark's own sub-directories are ever removed."""

    def __init__(self, out: str | Path, marker: str, owned: tuple[str, ...]):
        self.out, self.marker, self.owned = Path(out), marker, owned
        if self.out.exists() and (not self.out.is_dir() or (any(self.out.iterdir())
                                                            and not (self.out / marker).is_file())):
            raise AttncacheError(f"--out {self.out}: not empty and not an attncache benchmark directory; "
                                 "choose an empty or new directory")
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / marker, {"status": "running"})

    def fresh(self, name: str) -> Path:
        assert name in self.owned
        path = self.out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        return path

    def finish(self, result: dict, keep: tuple[str, ...] = ()) -> None:
        for name in self.owned:
            path = self.out / name
            if name not in keep and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
        atomic_write_json(self.out / self.marker, result)


@torch.no_grad()
def _inference_from_source(model, source, jobs, one, b: ExtractBench, device: torch.device) -> None:
    """Plain inference over the dataset as a user runs it: images read from the source, decoded and rendered by
    `extract`'s number of threads, the never-hooked teacher's forward per batch; nothing captured or written. The
    source is listed and its views drawn beforehand (`_view_renderer`), as extraction does before its pipeline."""
    images = dict(source.iter_bytes(range(len(jobs) // b.views)))
    with ThreadPoolExecutor(b.workers) as pool, teacher_autocast(device, b.amp):
        rendered = pool.map(lambda job: one(job, images[job[0]]), jobs)  # renders ahead while the teacher runs
        while batch := list(itertools.islice(rendered, b.batch_size)):
            model.forward_features(torch.stack(batch).to(device))
    _sync(device)


def build_teachers(teacher: TeacherOptions, device: str) -> tuple:
    """(plain, hooked, spec): the teacher as a user runs it (never hooked) and a second one for the capture, on
    `device`. `bench_extract` builds them, or takes them (several payloads, one build of a large teacher)."""
    plain, spec = teacher.build(parse_device(device))
    hooked, _ = teacher.build(parse_device(device))
    return plain, hooked, spec


def bench_extract(b: ExtractBench, teachers: tuple | None = None) -> dict:
    """`teachers`: `build_teachers(b.teacher, b.device)`, when the caller already built them."""
    device = parse_device(b.device)
    codec = get_codec(b.codec, **b.codec_params)
    payload = codec.payloads[0]
    work = BenchDir(b.out, "bench_extract.json", ("encode", "extract"))
    plain, hooked, spec = teachers or build_teachers(b.teacher, b.device)
    layers = parse_layers(b.layers, spec.depth)
    pixels = rendered_views(open_source(b.data, limit=b.limit), spec, b.views)
    batches = [pixels[i:i + b.batch_size].to(device) for i in range(0, len(pixels), b.batch_size)]
    n = len(pixels)

    @torch.no_grad()
    def teacher_only():
        with teacher_autocast(device, b.amp):
            for x in batches:
                plain.forward_features(x)
        _sync(device)

    with AttentionCapture(hooked, layers, payload) as capture:
        def teacher_capture():
            with teacher_autocast(device, b.amp):
                for x in batches:
                    capture(x)
            _sync(device)

        teacher_only(), teacher_capture()  # warm-up
        teacher_rate = _best_rate(teacher_only, n, b.repeats)
        source = open_source(b.data, limit=b.limit)
        jobs, one = _view_renderer(source, spec, b.views)
        inference_rate = _best_rate(lambda: _inference_from_source(plain, source, jobs, one, b, device), n, b.repeats)
        capture_rate = _best_rate(teacher_capture, n, b.repeats)
        with teacher_autocast(device, b.amp):
            captured = [capture(x).cpu() for x in batches]

    # the full pipeline (views rendered from source bytes, teacher, encode, write), as `attncache extract` runs it
    pipeline_repeats = b.pipeline_repeats or b.repeats
    best = 0.0
    for _ in range(pipeline_repeats):
        stats: dict = {}
        extract(ExtractConfig(teacher=b.teacher, data=b.data, out=str(work.fresh("extract")), format=b.format,
                              codec=b.codec, codec_params=b.codec_params, views=b.views, layers=b.layers,
                              batch_size=b.batch_size, device=b.device, records_per_shard=b.batch_size,
                              progress=False, limit=b.limit, amp=b.amp, workers=b.workers), stats=stats)
        best = max(best, stats["records"] / stats["pipeline_s"])

    # encode + write alone, from captures already in memory
    fields = codec.fields(spec.capture_shape(len(layers)))
    if codec.needs_basis:  # fitting is a once-per-cache cost, outside the measured rates: the pipeline's basis
        from ..cache import open_cache

        codec = open_cache(work.out / "extract").codec
    stored_bytes: list[int] = []

    def encode_write():
        root = work.fresh("encode")
        writer = WRITERS[b.format](root, fields, codec.compressor(), n, b.batch_size)
        for i, c in enumerate(captured):
            writer.write_shard(i, codec.encode(c, payload), [{}] * len(c))
        stored_bytes.append(sum((root / p).stat().st_size for i in range(len(captured)) for p in writer.shard_paths(i)))

    encode_write_rate = _best_rate(encode_write, n, pipeline_repeats)

    bound = min(capture_rate, encode_write_rate)
    serial = 1 / (1 / capture_rate + 1 / encode_write_rate)
    raw = int(np.prod(spec.capture_shape(len(layers)).map_shape)) * 2
    result = {
        "device": _device_name(device),
        "teacher": spec.model, "tokens": spec.num_tokens, "layers": len(layers), "views": n,
        "batch_size": b.batch_size, "format": b.format, "codec": b.codec, "payload": payload, "amp": b.amp,
        "render_workers": b.workers,
        "teacher_views_per_s": round(teacher_rate, 2),
        "teacher_with_capture_views_per_s": round(capture_rate, 2),
        "encode_write_views_per_s": round(encode_write_rate, 2),
        "extract_views_per_s": round(best, 2),
        "bound_views_per_s": round(bound, 2),
        "serial_views_per_s": round(serial, 2),
        "efficiency": round(best / bound, 3),
        "vs_serial": round(best / serial, 3),
        "capture_vs_plain_inference": round(capture_rate / teacher_rate, 3),
        "extract_vs_plain_inference": round(best / teacher_rate, 3),
        "inference_from_source_views_per_s": round(inference_rate, 2),
        "extract_vs_inference_from_source": round(best / inference_rate, 3),
        "raw_fp16_bytes_per_view": raw,
        "stored_bytes_per_view": round(stored_bytes[0] / n, 1),
        "ratio_vs_raw_fp16": round(raw * n / stored_bytes[0], 3),
    }
    if b.keep_cache:
        result["cache"] = str(work.out / "extract")
    work.finish(result, keep=("extract",) if b.keep_cache else ())
    return result


# ---------------------------------------------------------------------------------------------------------------
# training from a cache
#
# Cached training overlaps reading (worker processes: read, decompress, render) with the student's step (main
# process: decode on the device, forward, backward). Its ideal rate is min(student-only, read+decode); the goal is
# cached >= 0.9 x ideal. The live-teacher rate (same student, same views, maps from the teacher) is the baseline:
# a live step costs the teacher's forward T_teacher on top of the student's T_student, so cached / live can reach
# (T_teacher + T_student) / T_student (`live_cost_vs_student`), both T measured on a batch staged on the device.
# The cached and the live engine run one after the other, so each one's peak device memory is its own.


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
    from ..cache import open_cache

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
        "device": _device_name(device), "mode": b.mode, "teacher": s["teacher"], "tokens": s["tokens"],
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
    from ..train import TrainConfig, Trainer
    from ..train.loader import batches, make_loader

    def timed(loader, step, warmup: int) -> float:
        """Best images/s of `step(batch)` over `repeats` windows of `steps` batches, after `warmup` batches, across
        epochs if needed (one noisy window would make the ratios below exceed what is possible)."""
        rates, done, images, start = [], 0, 0, None
        while True:
            for batch in batches(loader):
                if done >= warmup and (done - warmup) % b.steps == 0:
                    _sync(device)
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
    _sync(device)

    def run():
        for _ in range(calls):
            fn()
        _sync(device)

    return 1e3 * _timed_best(run, repeats)[1] / calls


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


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


# ---------------------------------------------------------------------------------------------------------------
# codecs: size against error against speed, on the same real views
#
# Every codec encodes the same captured views. Sizes are the compressor's real output per record (what a shard
# holds, less container overhead). Errors are against the teacher's exact fp32 probabilities, per map row:
# KL(p ‖ p̂) in nats (mean and 99th percentile) and max |p̂ − p|. Throughputs are raw-fp16-equivalent MB/s (the
# bytes of the fp16 maps a record stands for) on one CPU core (torch and blosc limited to one thread):
# - encode: the codec's encode + compression (the extraction's writer);
# - decompress: compressed bytes -> compact fields (what loader workers do, on CPU);
# - decode: compact fields -> probabilities (the codec's decode + the softmax copy/distill apply), which training
#   runs on its device; `device_decode` is that step on --device with all its threads, fields already there.

DEFAULT_BENCH_CODECS = ("fp16", "qk", "qk:bits=8", "lowrank:rank=48", "lowrank", "lowrank:rank=32,bits=6",
                        "lowrank:rank=24,bits=6", "sqrtq:bits=8", "sqrtq", "sqrtq:bits=5", "logq:bits=8", "logq",
                        "logq:bits=5", "inputs:bits=16", "inputs", "inputs:bits=7", "inputs:bits=6",
                        "inputs:bits=5", "inputs:bits=4", "inputs_klt:step=0.005", "inputs_klt:step=0.01",
                        "inputs_klt", "inputs_klt:step=0.03", "inputs_klt:step=0.05", "inputs_klt:step=0.07", "cls")


@dataclass
class CodecBench:
    teacher: TeacherOptions = field(default_factory=lambda: TeacherOptions("demo"))
    data: str = "demo"
    layers: str = "all"
    limit: int | None = None
    batch_size: int = 8
    device: str = "cpu"
    codecs: tuple[str, ...] = DEFAULT_BENCH_CODECS
    repeats: int = 2


def _measure_codec(codec, fields, captured, reference, raw, device, repeats) -> dict:
    payload = codec.payloads[0]
    compressor = numcodecs.get_codec(dict(codec.compressor()))
    views = sum(len(x) for x in captured[payload])
    with _one_core():
        encoded, encode_s = _timed_best(lambda: [_encode_batch(codec, x, payload, compressor)
                                                for x in captured[payload]], repeats)
        unpacked, decompress_s = _timed_best(lambda: [_decompress(blobs, fields, compressor)
                                                     for blobs in encoded], repeats)
        decoded, decode_s = _timed_best(lambda: [_to_probs(codec, codec.decode(f), payload) for f in unpacked],
                                        repeats)
    stored = sum(len(blob) for blobs in encoded for per_record in blobs.values() for blob in per_record)
    errors = _errors(reference, decoded, codec.query_rows)
    del decoded
    mb = raw * views / 1e6  # raw-equivalent MB the measured work stands for
    return {"params": codec.params, "payload": payload, "lossless": codec.lossless,
            "bytes_per_view": round(stored / views), "ratio_vs_raw_fp16": round(raw * views / stored, 3), **errors,
            "encode_MBps_per_core": round(mb / encode_s, 1),
            "decompress_MBps_per_core": round(mb / decompress_s, 1),
            "decode_MBps_per_core": round(mb / decode_s, 1),
            "device_decode_MBps": round(device_decode_rate(codec, unpacked, payload, device, repeats) * raw / 1e6,
                                        1)}


def parse_codec_spec(spec: str) -> tuple[str, dict]:
    """`lowrank:rank=32,bits=6` -> ("lowrank", {"rank": 32, "bits": 6})."""
    name, _, params = spec.partition(":")
    return name, parse_kwargs([p for p in params.split(",") if p], "--codec")


def bench_codecs(b: CodecBench) -> dict:
    device = parse_device(b.device)
    codecs = []  # bad names and parameters fail before the teacher runs
    for codec_spec in b.codecs:
        name, params = parse_codec_spec(codec_spec)
        codecs.append((codec_spec, get_codec(name, **params)))
    model, spec = b.teacher.build(device)
    layers = parse_layers(b.layers, spec.depth)
    shape = spec.capture_shape(len(layers))
    pixels = rendered_views(open_source(b.data, limit=b.limit), spec, 1)
    batches = [pixels[i:i + b.batch_size] for i in range(0, len(pixels), b.batch_size)]
    views = len(pixels)
    captured = {}
    for payload in {"probs"} | {codec.payloads[0] for _, codec in codecs}:  # probs: every error's reference
        with AttentionCapture(model, layers, payload) as capture:
            captured[payload] = [capture(x.to(device)).cpu() for x in batches]
    reference = captured["probs"]
    raw = int(np.prod(shape.map_shape)) * 2
    if any(codec.needs_projections for _, codec in codecs):
        projections = from_model(model, layers)  # what a cache of these codecs carries
        for _, codec in codecs:
            if codec.needs_projections:
                codec.bind(projections)

    rows = []
    for name, codec in codecs:
        try:
            fields = codec.fields(shape)
        except AttncacheError:
            if b.codecs != DEFAULT_BENCH_CODECS:
                raise
            continue  # the default sweep's ranks are sized for real teachers (head_dim 64)
        if codec.needs_basis:  # fitted on the first half of the views, measured on the other half (held out)
            half = max(1, len(batches) // 2)
            codec.bind_basis(fit_basis(torch.cat(captured["inputs"][:half]), projections))
            held_out = {p: x[half:] or x for p, x in captured.items()}
            rows.append({"codec": name, "fitted_on_views": sum(len(x) for x in captured["inputs"][:half]),
                         **_measure_codec(codec, fields, held_out, held_out["probs"], raw, device, b.repeats)})
            continue
        rows.append({"codec": name, **_measure_codec(codec, fields, captured, reference, raw, device, b.repeats)})
    return {"device": _device_name(device), "teacher": spec.model, "image_size": spec.image_size,
            "tokens": spec.num_tokens, "heads": spec.num_heads, "layers": layers, "views": views,
            "raw_fp16_bytes_per_view": raw, "codecs": rows}


class _one_core:
    """torch and blosc on one thread: per-core rates."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.blosc = numcodecs.blosc.get_nthreads()
        numcodecs.blosc.set_nthreads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)
        numcodecs.blosc.set_nthreads(self.blosc)


def _timed_best(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def _encode_batch(codec, captured, payload, compressor) -> dict[str, list[bytes]]:
    """{field: [compressed bytes per record]}, exactly what a store writes per record."""
    arrays = codec.encode(captured, payload)
    return {k: [compressor.encode(np.ascontiguousarray(a[j])) for j in range(len(a))] for k, a in arrays.items()}


def _decompress(blobs, fields, compressor) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.stack([np.frombuffer(compressor.decode(blob), dtype=fields[k].dtype)
                                          .reshape(fields[k].shape) for blob in per_record]))
            for k, per_record in blobs.items()}


def _to_probs(codec, maps: torch.Tensor, payload: str) -> torch.Tensor:
    return maps.softmax(-1) if codec.decodes_to(payload) == "logits" else maps


def device_decode_rate(codec, unpacked, payload, device, repeats) -> float:
    """Views/s of decode (+ softmax) with the compact fields already on `device` (all of its threads)."""
    on_device = [{k: v.to(device) for k, v in f.items()} for f in unpacked]
    views = sum(len(next(iter(f.values()))) for f in on_device)

    def run():
        for f in on_device:
            _to_probs(codec, codec.decode(f), payload)
        _sync(device)

    run()  # warm-up (kernels, allocator)
    return views / _timed_best(run, repeats)[1]


def row_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per row, in float64: Σ_j p log(p/q) − p + q, the KL(p ‖ q) extended to rows that do not sum to one exactly
    (fp16 maps). Every term is ≥ 0 by construction (x log x − x + 1 ≥ 0, computed through log1p so that rows equal
    up to round-off give tiny positive terms, never negative ones). Entries below 1e-30 count as 1e-30."""
    p, q = p.double().clamp_min(1e-30), q.double().clamp_min(1e-30)
    r, delta = p / q, (p - q) / q
    near = (1 + delta) * torch.log1p(delta) - delta  # r = 1 + delta close to 1: no cancellation
    far = torch.xlogy(r, r) - r + 1  # r far from 1 (r = 0 included): nothing cancels
    return (q * torch.where(delta.abs() < 0.5, near, far)).sum(-1)


def _errors(reference: list[torch.Tensor], decoded: list[torch.Tensor], query_rows: str) -> dict:
    """Mean and p99 of the per-row divergence of p̂ from p in nats (`row_divergence`: the KL for normalised rows),
    and max |p̂ − p|, over every row of every view."""
    kls, max_abs = [], 0.0
    for p, q in zip(reference, decoded, strict=True):
        if query_rows == "cls":
            p = p[..., :1, :]
        kls.append(row_divergence(p, q).flatten())
        max_abs = max(max_abs, (q.float() - p).abs().max().item())
    kl = torch.cat(kls)
    return {"kl_mean": float(f"{kl.mean().item():.3g}"), "kl_p99": float(f"{torch.quantile(kl, 0.99).item():.3g}"),
            "max_abs_err": float(f"{max_abs:.3g}")}

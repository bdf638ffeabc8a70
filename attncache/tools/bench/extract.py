"""`attncache bench extract`: views/s of the teacher as a user runs it, of the teacher with the capture, of encode
+ write alone and of the whole extraction, and the bytes a cache stores per view, measured in one run on one device.

Extraction overlaps the teacher (with capture) and the encode+write stage, so its rate is at most
  min(teacher+capture, encode+write)          (`bound`: no pipeline beats its slowest stage), and it reaches about
  1 / (1/(teacher+capture) + 1/encode+write)  (`serial`) when both stages share the same CPU cores.
`efficiency` = extract / bound (at most 1, up to timing noise); `extract_vs_plain_inference` compares with the teacher
as a user runs it: a fresh timm model, fused attention, no hooks.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ...codecs import get_codec
from ...device import parse_device
from ...extract import ExtractConfig, extract
from ...extract.pipeline import teacher_autocast  # what `extract --amp` runs its teacher under
from ...sources import open_source
from ...store import WRITERS
from ...teacher import AttentionCapture, TeacherOptions, parse_layers
from .common import BenchDir, best_rate, device_name, rendered_views, sync, view_renderer


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


@torch.no_grad()
def _inference_from_source(model, source, jobs, one, b: ExtractBench, device: torch.device) -> None:
    """Plain inference over the dataset as a user runs it: images read from the source, decoded and rendered by
    `extract`'s number of threads, the never-hooked teacher's forward per batch; nothing captured or written. The
    source is listed and its views drawn beforehand (`view_renderer`), as extraction does before its pipeline."""
    images = dict(source.iter_bytes(range(len(jobs) // b.views)))
    with ThreadPoolExecutor(b.workers) as pool, teacher_autocast(device, b.amp):
        rendered = pool.map(lambda job: one(job, images[job[0]]), jobs)  # renders ahead while the teacher runs
        while batch := list(itertools.islice(rendered, b.batch_size)):
            model.forward_features(torch.stack(batch).to(device))
    sync(device)


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
        sync(device)

    with AttentionCapture(hooked, layers, payload) as capture:
        def teacher_capture():
            with teacher_autocast(device, b.amp):
                for x in batches:
                    capture(x)
            sync(device)

        teacher_only(), teacher_capture()  # warm-up
        teacher_rate = best_rate(teacher_only, n, b.repeats)
        source = open_source(b.data, limit=b.limit)
        jobs, one = view_renderer(source, spec, b.views)
        inference_rate = best_rate(lambda: _inference_from_source(plain, source, jobs, one, b, device), n, b.repeats)
        capture_rate = best_rate(teacher_capture, n, b.repeats)
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
    if codec.side_files:  # bound to the pipeline's own (fitting one is a once-per-cache cost, outside the rates)
        from ...cache import open_cache

        codec = open_cache(work.out / "extract").codec
    stored_bytes: list[int] = []

    def encode_write():
        root = work.fresh("encode")
        writer = WRITERS[b.format](root, fields, codec.compressor(), n, b.batch_size)
        for i, c in enumerate(captured):
            writer.write_shard(i, codec.encode(c, payload), [{}] * len(c))
        stored_bytes.append(sum((root / p).stat().st_size for i in range(len(captured)) for p in writer.shard_paths(i)))

    encode_write_rate = best_rate(encode_write, n, pipeline_repeats)

    bound = min(capture_rate, encode_write_rate)
    serial = 1 / (1 / capture_rate + 1 / encode_write_rate)
    raw = int(np.prod(spec.capture_shape(len(layers)).map_shape)) * 2
    result = {
        "device": device_name(device),
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

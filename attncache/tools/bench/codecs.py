"""`attncache bench codecs`: each codec's size against its error against its speed, on the same real views.

Every codec encodes the same captured views. Sizes are the compressor's real output per record (what a shard
holds, less container overhead). Errors are against the teacher's exact fp32 probabilities, per map row:
KL(p ‖ p̂) in nats (mean and 99th percentile) and max |p̂ − p|. Throughputs are raw-fp16-equivalent MB/s (the
bytes of the fp16 maps a record stands for) on one CPU core (torch and blosc limited to one thread):
- encode: the codec's encode + compression (the extraction's writer);
- decompress: compressed bytes -> compact fields (what loader workers do, on CPU);
- decode: compact fields -> probabilities (the codec's decode + the softmax copy/distill apply), which training
  runs on its device; `device_decode` is that step on --device with all its threads, fields already there.
A codec with a fitted side file (`inputs_klt`) is fitted on the first half of the views and measured on the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numcodecs
import numpy as np
import torch

from ...codecs import SideFileInputs, get_codec
from ...device import parse_device
from ...errors import AttncacheError
from ...sources import open_source
from ...teacher import AttentionCapture, TeacherOptions, parse_kwargs, parse_layers
from .common import device_name, rendered_views, row_divergence, sync, timed_best

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


def parse_codec_spec(spec: str) -> tuple[str, dict]:
    """`lowrank:rank=32,bits=6` -> ("lowrank", {"rank": 32, "bits": 6})."""
    name, _, params = spec.partition(":")
    return name, parse_kwargs([p for p in params.split(",") if p], "`codec`")


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
    raw = int(np.prod(shape.map_shape)) * 2
    half = max(1, len(batches) // 2)  # a codec with a fitted side file is fitted on these batches, measured on the rest
    held_out = {p: x[half:] or x for p, x in captured.items()}

    rows = []
    for name, codec in codecs:
        try:
            fields = codec.fields(shape)
        except AttncacheError:
            if b.codecs != DEFAULT_BENCH_CODECS:
                raise
            continue  # the default sweep's ranks are sized for real teachers (head_dim 64)
        fitting = captured[codec.payloads[0]][:half]
        teacher = SideFileInputs(model, layers, _calibration_of(fitting))
        # the side files a cache of this codec carries, bound as its reader binds them
        codec.bind({side.name: side.build(codec, teacher) for side in codec.side_files}, shape)
        row = {"codec": name}
        if fitted := any(side.fitted for side in codec.side_files):
            row["fitted_on_views"] = sum(len(x) for x in fitting)
        rows.append({**row, **_measure_codec(codec, fields, held_out if fitted else captured, raw, device,
                                             b.repeats)})
    return {"device": device_name(device), "teacher": spec.model, "image_size": spec.image_size,
            "tokens": spec.num_tokens, "heads": spec.num_heads, "layers": layers, "views": views,
            "raw_fp16_bytes_per_view": raw, "codecs": rows}


def _measure_codec(codec, fields, captured, raw, device, repeats) -> dict:
    """One codec's row on `captured` ({payload: batches}), its errors against the batches of `captured["probs"]`."""
    payload = codec.payloads[0]
    compressor = numcodecs.get_codec(dict(codec.compressor()))
    views = sum(len(x) for x in captured[payload])
    with _one_core():
        encoded, encode_s = timed_best(lambda: [_encode_batch(codec, x, payload, compressor)
                                                for x in captured[payload]], repeats)
        unpacked, decompress_s = timed_best(lambda: [_decompress(blobs, fields, compressor)
                                                     for blobs in encoded], repeats)
        decoded, decode_s = timed_best(lambda: [_to_probs(codec, codec.decode(f), payload) for f in unpacked],
                                       repeats)
    stored = sum(len(blob) for blobs in encoded for per_record in blobs.values() for blob in per_record)
    errors = _errors(captured["probs"], decoded, codec.query_rows)
    del decoded
    mb = raw * views / 1e6  # raw-equivalent MB the measured work stands for
    return {"params": codec.params, "payload": payload, "lossless": codec.lossless,
            "bytes_per_view": round(stored / views), "ratio_vs_raw_fp16": round(raw * views / stored, 3), **errors,
            "encode_MBps_per_core": round(mb / encode_s, 1),
            "decompress_MBps_per_core": round(mb / decompress_s, 1),
            "decode_MBps_per_core": round(mb / decode_s, 1),
            "device_decode_MBps": round(device_decode_rate(codec, unpacked, payload, device, repeats) * raw / 1e6,
                                        1)}


def _calibration_of(batches: list[torch.Tensor]):
    """`SideFileInputs.calibration` of these captured batches, whatever count is asked for (the bench fits on the
    first half of its views and measures on the other half); concatenated only when a fitted side file asks."""
    return lambda count: torch.cat(batches)


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
        sync(device)

    run()  # warm-up (kernels, allocator)
    return views / timed_best(run, repeats)[1]


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

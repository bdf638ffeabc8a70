"""`attncache plan`: what a cache costs on paper, before anyone buys disks (docs/costs.md explains every formula).

Sizes come from each codec's own `fields()` (the raw bytes a record holds before compression) times a compression
ratio measured on a real teacher (`MEASURED_BYTES_PER_VIEW`), or one the caller measured (`--ratio`,
`--bits-per-element`, `measured_ratio(cache)`). FLOPs count matrix products only (a multiply-add is 2 FLOPs), the
convention of `torch.utils.flop_counter`; softmax, norms and activations are left out. Times assume every GPU
workload (student step, teacher forward, decode) runs at the FLOP rate the student step reaches at the given
images/s, so no hardware figure is needed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..codecs import get_codec
from ..codecs.inputs import PROJECTIONS
from ..codecs.qk import QKCodec
from ..errors import AttncacheError
from ..teacher.capture import CaptureShape, parse_layers
from ..teacher.registry import DEMO_TEACHER, geometry, parse_kwargs, resolve_name

IMAGENET_TRAIN_IMAGES = 1_281_167

# Bytes per view of each codec, measured by `attncache bench codecs` on the real DINOv2-S/14 teacher at 224 px (all 12
# layers, 6 heads, 257 tokens, head_dim 64) over 20 photos: docs/benchmarks.md, "Compact codecs", the table of the
# `inputs_klt` section ("every codec in one run of the default sweep"); the rows it does not repeat
# (`lowrank:rank=32,bits=6`, `sqrtq:bits=5`, `logq`, `logq:bits=5`, `inputs:bits=7`, `inputs:bits=5`) are from the
# `inputs` section's table and the first photo table, which the sweep repeats to the digit. A ratio is these bytes
# over the codec's raw field bytes at that geometry, so it carries to another teacher's geometry.
MEASURED_ON = CaptureShape(layers=12, heads=6, tokens=257, head_dim=64)
MEASURED_BYTES_PER_VIEW = {
    "fp16": 7_240_930, "qk": 4_066_100, "qk:bits=8": 2_246_049,
    "lowrank:rank=48": 1_332_859, "lowrank": 973_978, "lowrank:rank=32,bits=6": 682_572,
    "lowrank:rank=24,bits=6": 557_428,
    "sqrtq:bits=8": 2_455_868, "sqrtq": 1_303_951, "sqrtq:bits=5": 929_039,
    "logq:bits=8": 4_018_062, "logq": 2_698_192, "logq:bits=5": 1_944_655,
    "inputs:bits=16": 2_024_403, "inputs": 1_155_918, "inputs:bits=7": 995_895, "inputs:bits=6": 844_538,
    "inputs:bits=5": 690_272, "inputs:bits=4": 528_101,
    "inputs_klt:step=0.005": 794_133, "inputs_klt:step=0.01": 645_300, "inputs_klt": 500_970,
    "inputs_klt:step=0.03": 419_600, "inputs_klt:step=0.05": 322_144, "inputs_klt:step=0.07": 261_798,
    "cls": 31_034,
}
MEASURED_SOURCE = "docs/benchmarks.md#compact-codecs (bench codecs, DINOv2-S/14 @ 224, 20 photos)"
ALL_CODECS = ("fp16", "fp32", "cls", "qk", "lowrank", "sqrtq", "logq", "inputs", "inputs_klt")  # defaults of each


@dataclass(frozen=True)
class Geometry:
    """What the costs depend on: a standard ViT (timm `Mlp` of `mlp_ratio`·D hidden units, [CLS] + registers)."""

    depth: int
    heads: int
    embed_dim: int
    patch_size: int
    image_size: int
    prefix_tokens: int = 1
    mlp_ratio: float = 4.0
    model: str = ""

    def __post_init__(self):
        if min(self.depth, self.heads, self.embed_dim, self.patch_size, self.image_size) < 1 or self.prefix_tokens < 0:
            raise AttncacheError(f"geometry {self}: sizes must be >= 1")
        if self.embed_dim % self.heads or self.image_size % self.patch_size:
            raise AttncacheError(f"geometry {self}: embed_dim must divide by heads, image size by patch size")

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens(self) -> int:
        return self.prefix_tokens + self.patches

    def capture_shape(self, layers: int) -> CaptureShape:
        return CaptureShape(layers, self.heads, self.tokens, self.embed_dim // self.heads)


def timm_geometry(name: str, image_size: int | None = None, args: dict | None = None) -> Geometry:
    """The geometry of a teacher alias or timm ViT name, built on the meta device: no weights, no download."""
    import timm

    model_name, args = resolve_name(name), dict(args or {})
    if name == "demo":
        args, image_size = {**DEMO_TEACHER["args"], **args}, image_size or DEMO_TEACHER["image_size"]
    if image_size is not None:
        args["img_size"] = image_size
    if not timm.is_model(model_name.split(".")[0]):
        raise AttncacheError(f"unknown teacher {name!r}: not an alias nor a timm model name")
    try:
        with torch.device("meta"):
            model = timm.create_model(model_name, pretrained=False, num_classes=0, **args)
    except (RuntimeError, ValueError, TypeError, AssertionError) as exc:
        raise AttncacheError(f"cannot build {model_name!r} with {args}: {' '.join(str(exc).split())[:300]}") from exc
    g = geometry(model, model_name)
    return Geometry(g["depth"], g["num_heads"], g["embed_dim"], g["patch_size"], g["image_size"],
                    g["num_prefix_tokens"], model.blocks[0].mlp.fc1.out_features / g["embed_dim"], model_name)


# -- FLOPs (matmuls only; 2 per multiply-add) ---------------------------------------------------------------------


def vit_forward_flops(g: Geometry, blocks: int | None = None) -> float:
    """One image through the patch embedding and the first `blocks` blocks (all by default). Per block and token:
    qkv 3D², proj D², MLP 2rD² multiply-adds, so 2N(4 + 2r)D² = 24ND² at r = 4, plus q·kᵀ and attn·v, 4N²D."""
    n, d = g.tokens, g.embed_dim
    patch_embed = 2 * g.patches * 3 * g.patch_size ** 2 * d
    block = 2 * n * (4 + 2 * g.mlp_ratio) * d * d + 4 * n * n * d
    return float(patch_embed + (g.depth if blocks is None else blocks) * block)


def decode_flops(codec, shape: CaptureShape) -> float:
    """Matmul FLOPs of one record's decode on the training device. Maps (fp16, fp32, cls, sqrtq, logq): none, only
    elementwise work. qk/lowrank: q kᵀ per head at the stored rank. inputs/inputs_klt: the q and k projections
    (2·N·D·2D; the Hadamard rotation or fitted basis is folded into them once) and q kᵀ (2N²D) per layer."""
    layers, heads, n, d = shape
    if isinstance(codec, QKCodec):
        return float(layers * heads * 2 * n * n * codec.rank(shape))
    if PROJECTIONS in codec.side_files:
        dim = heads * d
        return float(layers * (2 * n * dim * 2 * dim + 2 * n * n * dim))
    return 0.0


# -- bytes ----------------------------------------------------------------------------------------------------------


def codec_spec(codec) -> str:
    params = ",".join(f"{k}={v}" for k, v in codec.params.items() if v is not None)
    return f"{codec.name}:{params}" if params else codec.name


def parse_codec(spec: str):
    """`lowrank:rank=32,bits=6` -> the codec (its params completed with the defaults)."""
    name, _, params = spec.partition(":")
    return get_codec(name, **parse_kwargs([p for p in params.split(",") if p], "`codec`"))


def raw_bytes(codec, shape: CaptureShape) -> int:
    """One record's field bytes before compression, from the codec's own field layout."""
    return sum(f.nbytes for f in codec.fields(shape).values())


def field_elements(codec, shape: CaptureShape) -> int:
    return sum(int(np.prod(f.shape)) for f in codec.fields(shape).values())


def measured_ratio_of(codec) -> float | None:
    """Compressed / raw field bytes of this codec with these params, from the measured table (None: unmeasured)."""
    for spec, stored in MEASURED_BYTES_PER_VIEW.items():
        measured = parse_codec(spec)
        if measured.name == codec.name and measured.params == codec.params:
            return stored / raw_bytes(measured, MEASURED_ON)
    return None


def measured_ratio(cache: str | Path) -> dict:
    """Compressed / raw field bytes of a finished local cache: its shard files' bytes (the manifest's) over its
    records' raw field bytes."""
    try:
        manifest = json.loads((Path(cache) / "manifest.json").read_text())
        codec = get_codec(manifest["codec"]["name"], **manifest["codec"]["params"])
        t = manifest["teacher"]
        shape = CaptureShape(len(manifest["capture"]["layers"]), t["num_heads"], t["num_tokens"],
                             t["embed_dim"] // t["num_heads"])
        stored = sum(f["bytes"] for s in manifest["store"]["shards"] for f in s["files"])
        records = manifest["store"]["records"]
    except (OSError, ValueError, KeyError, TypeError) as exc:  # not a finished local cache
        raise AttncacheError(f"`ratio_from` {cache}: no readable manifest.json of a finished cache ({exc})") from exc
    return {"codec": codec_spec(codec), "records": records, "shard_bytes": stored,
            "raw_bytes": records * raw_bytes(codec, shape), "ratio": stored / (records * raw_bytes(codec, shape))}


def ratio_from_cache(cache: str | Path, codecs: list[str], ratio: float | None,
                     bits_per_element: float | None) -> tuple[float, list[str]]:
    """`--ratio-from CACHE`: (its measured ratio, the codecs to plan: the cache's unless the same one was named)."""
    if ratio is not None or bits_per_element is not None:
        raise AttncacheError("give `ratio_from`, `ratio` or `bits_per_element`, not several")
    measured = measured_ratio(cache)
    if codecs not in (["all"], []) and {codec_spec(parse_codec(c)) for c in codecs} != {measured["codec"]}:
        raise AttncacheError(f"`ratio_from` {cache}: a {measured['codec']} cache; its ratio is not `codec` "
                             f"{' '.join(codecs)}'s")
    return measured["ratio"], [measured["codec"]]


def side_file_bytes(codec, shape: CaptureShape) -> int:
    """The codec's once-per-cache side files (docs/format.md), each by its own estimate (`SideFile.nbytes`):
    `teacher_qk.safetensors` (W_qk 2D×D + bias 2D per layer) for codecs that recompute maps,
    `inputs_basis.safetensors` (mean D + D×D per layer) for inputs_klt. Their small headers, q/k-norm parameters
    and the record tables (tens to hundreds of bytes per record) are left out."""
    return sum(side.nbytes(shape) for side in codec.side_files)


# -- the plan -------------------------------------------------------------------------------------------------------


@dataclass
class PlanInputs:
    teacher: Geometry
    layers: str = "reference"  # as `extract --layers`: the attention-transfer reference's first depth-3
    codecs: tuple[str, ...] = ("fp16",)
    student: Geometry | None = None  # None: the teacher's architecture (attention transfer needs it)
    images: int = IMAGENET_TRAIN_IMAGES
    views: int = 4
    epochs: int = 200
    images_per_s: float = 1000.0  # the student's training rate per GPU with its maps in hand (no teacher, no decode)
    gpus_per_node: int = 8
    read_GBps_per_node: float | None = None  # storage bandwidth a node can read at (None: unlimited)
    ratio: float | None = None  # compressed / raw field bytes, overriding the measured table
    bits_per_element: float | None = None  # compressed bits per stored field element, overriding the table

    def check(self) -> None:
        for name in ("images", "views", "epochs", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise AttncacheError(f"`{name}` {getattr(self, name)}: must be >= 1")
        for name in ("images_per_s", "read_GBps_per_node", "ratio", "bits_per_element"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise AttncacheError(f"`{name}` {value}: must be > 0")
        if self.ratio is not None and self.bits_per_element is not None:
            raise AttncacheError("give `ratio` or `bits_per_element`, not both")


def plan(p: PlanInputs) -> dict:
    p.check()
    teacher, student = p.teacher, p.student or p.teacher
    layers = parse_layers(p.layers, teacher.depth)
    shape = teacher.capture_shape(len(layers))
    teacher_flops = vit_forward_flops(teacher, layers[-1] + 1)  # extraction and a live teacher stop there
    train_flops = 3 * vit_forward_flops(student)  # forward + backward (2x forward)
    flop_rate = p.images_per_s * train_flops  # what the GPU achieves on the student step: the unit of time below
    live_ips = flop_rate / (train_flops + teacher_flops)
    return {"teacher": vars(teacher), "student": vars(student), "layers": layers, "capture_shape": shape._asdict(),
           "images": p.images, "views": p.views, "records": p.images * p.views, "epochs": p.epochs,
           "images_per_s_per_gpu": p.images_per_s, "gpus_per_node": p.gpus_per_node,
           "read_GBps_per_node": p.read_GBps_per_node,
           "teacher_forward_flops_per_view": teacher_flops, "student_train_flops_per_image": train_flops,
           "live_images_per_s_per_gpu": live_ips,
           "gpu_hours_live_run": p.images * p.epochs / live_ips / 3600,
           "codecs": [_codec_row(spec, p, shape, teacher_flops, train_flops, flop_rate, live_ips) for spec in p.codecs]}


def _codec_row(spec, p: PlanInputs, shape, teacher_flops, train_flops, flop_rate, live_ips) -> dict:
    codec = parse_codec(spec)
    raw = raw_bytes(codec, shape)
    if p.ratio is not None:
        ratio, source = p.ratio, "given (--ratio)"
    elif p.bits_per_element is not None:
        ratio, source = p.bits_per_element * field_elements(codec, shape) / 8 / raw, "given (--bits-per-element)"
    elif (ratio := measured_ratio_of(codec)) is not None:
        source = MEASURED_SOURCE
    elif codec.name == "fp32":  # never measured; fp16's 1.31x says fp32 would compress a little: an upper bound
        ratio, source = 1.0, "not measured: 1.0 assumed (no compression)"
    else:
        raise AttncacheError(f"codec {codec_spec(codec)!r}: no measured ratio (measured: "
                             f"{', '.join(MEASURED_BYTES_PER_VIEW)}); pass `ratio` or `bits_per_element`")
    per_view = raw * ratio
    records = p.images * p.views
    side = side_file_bytes(codec, shape)
    decode = decode_flops(codec, shape)
    read_per_gpu = per_view * p.images_per_s  # at the student's rate: an upper bound (decode slows it by decode/train)
    cached_ips = flop_rate / (train_flops + decode)
    if p.read_GBps_per_node is not None:
        cached_ips = min(cached_ips, p.read_GBps_per_node * 1e9 / p.gpus_per_node / per_view)
    extract_hours = records * teacher_flops / flop_rate / 3600
    live_hours, cached_hours = p.images * p.epochs / live_ips / 3600, p.images * p.epochs / cached_ips / 3600
    saved_hours = live_hours - cached_hours
    return {
        "codec": spec, "params": codec.params, "raw_bytes_per_view": raw, "ratio": ratio, "ratio_source": source,
        "bytes_per_view": per_view, "bits_per_element": 8 * per_view / field_elements(codec, shape),
        "ratio_vs_raw_fp16": shape.layers * shape.heads * shape.tokens ** 2 * 2 / per_view,
        "shard_bytes": per_view * records, "side_file_bytes": side, "cache_bytes": per_view * records + side,
        "read_GBps_per_gpu": read_per_gpu / 1e9, "read_GBps_per_node": read_per_gpu * p.gpus_per_node / 1e9,
        "extract_write_GBps_per_gpu": per_view * flop_rate / teacher_flops / 1e9,
        "decode_flops_per_view": decode, "decode_vs_train_step": decode / train_flops,
        "teacher_flops_saved_per_run": p.images * p.epochs * teacher_flops,
        "decode_flops_per_run": p.images * p.epochs * decode,
        "extract_flops": records * teacher_flops,
        "cached_images_per_s_per_gpu": cached_ips,
        "gpu_hours_extract": extract_hours, "gpu_hours_cached_run": cached_hours,
        "gpu_hours_saved_per_run": saved_hours,
        # extraction + n cached runs = n live runs; None where a cached run is not faster than a live one
        "break_even_runs": extract_hours / saved_hours if saved_hours > 0 else None,
    }


def expand_codecs(specs: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """`all` -> every codec at its defaults; other specs as given."""
    out: list[str] = []
    for spec in specs:
        out.extend(ALL_CODECS if spec == "all" else [spec])
    return tuple(out) or ("fp16",)


def fmt_si(x: float, unit: str = "") -> str:
    """1.23e12 -> '1.23 T' (powers of 1000)."""
    if x == 0:
        return f"0 {unit}".strip()
    exp = min(max(int(math.floor(math.log10(abs(x)) / 3)), 0), 6)
    return f"{x / 1000 ** exp:.3g} {' kMGTPE'[exp].strip()}{unit}".strip()


def explicit_geometry(depth: int | None, heads: int | None, embed_dim: int | None, patch: int | None,
                      image_size: int | None, prefix_tokens: int = 1, mlp_ratio: float = 4.0) -> Geometry | None:
    """`--depth --heads --embed-dim --patch [--image-size]` as a Geometry; None when none of the four is given."""
    given = {"depth": depth, "heads": heads, "embed_dim": embed_dim, "patch": patch}
    if all(v is None for v in given.values()):
        return None
    if missing := [k for k, v in given.items() if v is None]:
        raise AttncacheError(f"an explicit geometry needs {', '.join(f'`{k}`' for k in missing)} too")
    return Geometry(depth, heads, embed_dim, patch, image_size or 224, prefix_tokens, mlp_ratio,
                    f"explicit depth {depth}, heads {heads}, width {embed_dim}, patch {patch}")


def plan_table(result: dict, markdown: bool = False):
    """The plan as a rich renderable: a table, or with `markdown` the title, a markdown table and the caption as
    plain lines (paste-ready for docs)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    t, s = result["teacher"], result["student"]
    shape = result["capture_shape"]
    title = (f"{t['model']} teacher ({len(result['layers'])} of {t['depth']} layers, {shape['heads']} heads, "
             f"N={shape['tokens']}), student {s['model']}; {result['images']:,} images x {result['views']} views, "
             f"{result['epochs']} epochs at {result['images_per_s_per_gpu']:g} img/s/GPU, "
             f"{result['gpus_per_node']} GPUs/node"
             + (f", {result['read_GBps_per_node']:g} GB/s read per node" if result["read_GBps_per_node"] else ""))
    caption = (f"teacher forward {fmt_si(result['teacher_forward_flops_per_view'], 'FLOP')}/view, student step "
               f"{fmt_si(result['student_train_flops_per_image'], 'FLOP')}/image; live-teacher run "
               f"{_num(result['gpu_hours_live_run'])} GPU-h at {result['live_images_per_s_per_gpu']:.0f} img/s/GPU")
    table = Table(box=box.MARKDOWN) if markdown else Table(title=title, caption=caption, box=box.HEAVY_HEAD)
    columns = ("codec", "stored/raw", "bytes/view", "vs fp16 maps", "cache", "read GB/s/GPU", "read GB/s/node",
               "decode/view (of a step)", "teacher FLOP saved/run", "extract GPU-h", "cached run GPU-h",
               "break-even runs")
    for col in columns:
        table.add_column(col, justify="left" if col == "codec" else "right")
    for r in result["codecs"]:
        runs = r["break_even_runs"]
        table.add_row(r["codec"], f"{r['ratio']:.3f}", fmt_si(r["bytes_per_view"], "B"),
                      f"{r['ratio_vs_raw_fp16']:.1f}x", fmt_si(r["cache_bytes"], "B"), _num(r["read_GBps_per_gpu"]),
                      _num(r["read_GBps_per_node"]),
                      f"{fmt_si(r['decode_flops_per_view'], 'FLOP')} ({100 * r['decode_vs_train_step']:.1f} %)"
                      if r["decode_flops_per_view"] else "none",
                      fmt_si(r["teacher_flops_saved_per_run"] - r["decode_flops_per_run"], "FLOP"),
                      _num(r["gpu_hours_extract"]), _num(r["gpu_hours_cached_run"]),
                      "never" if runs is None else _num(runs))
    return Group(Text(title), Text(), table, Text(), Text(caption)) if markdown else table


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"

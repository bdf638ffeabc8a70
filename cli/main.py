"""`attncache` command line: a thin typer skin over the Python API in `attncache`."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path

import typer

from attncache.errors import AttncacheError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cache a frozen ViT teacher's attention maps once; train students from the cache.")
bench_app = typer.Typer(no_args_is_help=True, help="Measurements (see docs/benchmarks.md).")
app.add_typer(bench_app, name="bench")


class StoreFormat(str, Enum):
    zarr = "zarr"
    wds = "wds"


class Split(str, Enum):
    train = "train"
    val = "val"


def _fail(exc: Exception) -> None:
    typer.echo("error: " + " ".join(str(exc).split()), err=True)  # one line, even for multi-line causes
    raise typer.Exit(2)


def _codec_params(pairs: list[str]) -> dict:
    from attncache.teachers import parse_teacher_args

    return parse_teacher_args(pairs)


@app.command()
def extract(
    teacher: str = typer.Option(..., help="alias (mae_vitl, dinov2_vits14, demo, ...) or any timm ViT name"),
    data: str = typer.Option(..., help="image folder, webdataset shards (path or URL), or 'demo'"),
    out: Path = typer.Option(..., help="cache directory (created; an unfinished one is resumed)"),
    format: StoreFormat = typer.Option(StoreFormat.zarr, "--format", help="zarr (random access) or wds (streaming)"),
    views: int = typer.Option(1, help="views per image (train split)"),
    split: Split = typer.Option(Split.train, help="train: random resized crops + flip; val: one center crop"),
    layers: str = typer.Option("all", help="all | reference (first depth-3) | indices like 0,1,4-8"),
    payload: str | None = typer.Option(None, help="probs | logits | qk (default: the codec's)"),
    codec: str = typer.Option("fp16", help="fp16 | fp32 | qk | lowrank | sqrtq | logq | cls (docs/format.md)"),
    codec_arg: list[str] = typer.Option([], "--codec-arg", help="codec parameter KEY=VALUE (bits=8, rank=32, ...)"),
    batch_size: int = typer.Option(32, help="teacher batch size"),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N"),
    amp: bool = typer.Option(False, help="bf16 autocast for the teacher on CUDA"),
    weights: Path | None = typer.Option(None, help="local weights: .safetensors, timm or MAE .pth"),
    pretrained: bool = typer.Option(True, help="download hub weights when --weights is not given"),
    image_size: int | None = typer.Option(None, help="teacher input size (default: the model's)"),
    teacher_arg: list[str] = typer.Option([], "--teacher-arg", help="timm kwarg KEY=VALUE (patch_size=8, ...)"),
    seed: int = typer.Option(0, help="seed the view parameters are drawn from"),
    shard_records: int | None = typer.Option(None, help="records per shard (default: ~256 MB raw)"),
    embed_images: bool = typer.Option(False, help="wds only: put the image bytes beside the maps"),
    workers: int = typer.Option(2, help="threads that decode and render images"),
    limit: int | None = typer.Option(None, help="only the first N images (smoke runs)"),
    quiet: bool = typer.Option(False, help="no progress output"),
):
    """Run the teacher once over DATA and write its attention maps to OUT."""
    from attncache.extract import ExtractConfig
    from attncache.extract import extract as run_extract
    from attncache.teachers import parse_teacher_args

    try:
        cfg = ExtractConfig(
            teacher=teacher, data=data, out=str(out), format=format.value, views=views, split=split.value,
            layers=layers, payload=payload, codec=codec, codec_params=_codec_params(codec_arg),
            batch_size=batch_size, device=device, amp=amp, weights=str(weights) if weights else None,
            pretrained=pretrained, image_size=image_size, teacher_args=parse_teacher_args(teacher_arg), seed=seed,
            records_per_shard=shard_records, embed_images=embed_images, workers=workers, limit=limit,
            progress=not quiet,
        )
        manifest = run_extract(cfg)
    except AttncacheError as exc:
        _fail(exc)
    typer.echo(f"wrote {out}: {manifest['store']['records']} records in {len(manifest['store']['shards'])} shards")


@app.command()
def inspect(cache: str = typer.Argument(..., help="cache directory or URL"),
            as_json: bool = typer.Option(False, "--json", help="machine-readable output")):
    """Summarise a cache: teacher, layers, codec, views, sizes."""
    from attncache import open_cache

    try:
        summary = open_cache(cache).summary()
    except AttncacheError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"attncache {cache}", show_header=False)
    for k, v in summary.items():
        table.add_row(k, f"{v:,.2f}" if isinstance(v, float) else str(v))
    Console().print(table)


@app.command()
def verify(cache: str = typer.Argument(..., help="cache directory or URL")):
    """Check every file's size and sha256 against the manifest, and that every shard decodes."""
    from attncache.verify import verify_cache

    try:
        result = verify_cache(cache)
    except AttncacheError as exc:
        _fail(exc)
    typer.echo(f"ok: {result['files']} files, {result['records']} records, {result['bytes']:,} bytes")


class Mode(str, Enum):
    copy = "copy"
    distill = "distill"
    gta = "gta"
    scratch = "scratch"
    finetune = "finetune"


@app.command()
def train(
    mode: Mode = typer.Option(..., help="copy | distill | gta (transfer), scratch | finetune (baselines)"),
    out: Path = typer.Option(..., help="run directory (created; an unfinished run is resumed)"),
    cache: str | None = typer.Option(None, help="train cache: teacher maps + views"),
    data: str | None = typer.Option(None, help="train images joined to the cache by key (or live views)"),
    val_cache: str | None = typer.Option(None, help="val cache (--split val); copy mode needs it"),
    val_data: str | None = typer.Option(None, help="val images (joined to --val-cache, or centre crops)"),
    student: str | None = typer.Option(None, help="timm name (default: the teacher's architecture)"),
    student_arg: list[str] = typer.Option([], "--student-arg", help="timm kwarg KEY=VALUE for --student"),
    teacher: str | None = typer.Option(None, help="live teacher instead of cached maps (baselines, parity)"),
    weights: Path | None = typer.Option(None, help="teacher weights: live teacher, gta/finetune start"),
    pretrained: bool = typer.Option(True, help="hub weights for a live teacher without --weights"),
    image_size: int | None = typer.Option(None, help="live teacher input size"),
    teacher_arg: list[str] = typer.Option([], "--teacher-arg", help="live teacher timm kwarg KEY=VALUE"),
    layers: str | None = typer.Option(None, help="transferred layers (default: first depth-3; gta: all cached)"),
    epochs: int = typer.Option(10), batch_size: int = typer.Option(64), lr: float = typer.Option(5e-4),
    min_lr: float = typer.Option(1e-6), weight_decay: float = typer.Option(0.05),
    beta2: float = typer.Option(0.999), warmup_epochs: float = typer.Option(1.0),
    label_smoothing: float = typer.Option(0.1),
    distill_weight: float = typer.Option(3.0, help="weight of the attention distillation loss"),
    gta_weight: float = typer.Option(0.1, help="GTA lambda on the [CLS]-row logit L2 penalty"),
    drop_path: float = typer.Option(0.0), clip_grad: float | None = typer.Option(None),
    ema: float | None = typer.Option(None, help="EMA decay (e.g. 0.9999)"),
    mixup: float = typer.Option(0.0, help="refused unless the cache carries mixed views"),
    cutmix: float = typer.Option(0.0, help="refused unless the cache carries mixed views"),
    seed: int = typer.Option(0), device: str = typer.Option("cpu", help="cpu | cuda | cuda:N"),
    amp: bool = typer.Option(True, help="bf16 autocast on CUDA (CPU runs fp32)"),
    workers: int = typer.Option(2, help="DataLoader worker processes"),
    max_steps: int | None = typer.Option(None, help="stop after N steps (checkpointed; resumable)"),
    save_every: int | None = typer.Option(None, help="also checkpoint every N steps"),
    log_every: int = typer.Option(10, help="steps per metrics.jsonl line"),
    quiet: bool = typer.Option(False, help="no progress output"),
):
    """Train a student from a cache (or a live teacher); re-running the same command resumes."""
    from attncache.teachers import parse_teacher_args
    from attncache.train import TrainConfig
    from attncache.train import train as run_train

    try:
        cfg = TrainConfig(
            mode=mode.value, out=str(out), cache=cache, data=data, val_cache=val_cache, val_data=val_data,
            student=student, student_args=parse_teacher_args(student_arg), teacher=teacher,
            weights=str(weights) if weights else None, pretrained=pretrained, image_size=image_size,
            teacher_args=parse_teacher_args(teacher_arg), layers=layers, epochs=epochs, batch_size=batch_size,
            lr=lr, min_lr=min_lr, weight_decay=weight_decay, beta2=beta2, warmup_epochs=warmup_epochs,
            label_smoothing=label_smoothing, distill_weight=distill_weight, gta_weight=gta_weight,
            drop_path=drop_path, clip_grad=clip_grad, ema=ema, mixup=mixup, cutmix=cutmix, seed=seed,
            device=device, amp=amp, workers=workers, max_steps=max_steps, save_every=save_every,
            log_every=log_every, progress=not quiet)
        results = run_train(cfg)
    except AttncacheError as exc:
        _fail(exc)
    typer.echo(json.dumps(results, indent=2))


@app.command("eval")
def evaluate(
    checkpoint: Path = typer.Option(..., help="run directory (or its model/ema .safetensors)"),
    val_cache: str | None = typer.Option(None, help="default: the run's"),
    val_data: str | None = typer.Option(None, help="default: the run's"),
    ensemble_with: Path | None = typer.Option(None, help="a finetune run: also report the averaged ensemble"),
    ema: bool = typer.Option(False, help="evaluate the EMA weights"),
    batch_size: int = typer.Option(64), device: str = typer.Option("cpu"), workers: int = typer.Option(0),
):
    """Top-1 of a trained student (and of its ensemble with a fine-tuned teacher)."""
    from attncache.evaluate import evaluate_run

    try:
        result = evaluate_run(str(checkpoint), val_cache, val_data, str(ensemble_with) if ensemble_with else None,
                              "ema" if ema else "model", device, batch_size, workers)
    except AttncacheError as exc:
        _fail(exc)
    typer.echo(json.dumps(result, indent=2))


@bench_app.command("extract")
def bench_extract(
    teacher: str = typer.Option("demo"), data: str = typer.Option("demo"), out: Path = typer.Option(...),
    batch_size: int = typer.Option(32), device: str = typer.Option("cpu"), weights: Path | None = None,
    image_size: int | None = None, teacher_arg: list[str] = typer.Option([], "--teacher-arg"),
    format: StoreFormat = typer.Option(StoreFormat.zarr, "--format"), codec: str = "fp16",
    layers: str = "all", limit: int | None = typer.Option(None, help="use the first N images"),
    views: int = typer.Option(4, help="views per image (more records per measured pass)"),
    repeats: int = typer.Option(3, help="passes per stage; the best is reported"),
):
    """Teacher inference rate, encode+write rate and extraction rate, measured in one run."""
    from attncache.bench import ExtractBench
    from attncache.bench import bench_extract as run

    try:
        result = run(ExtractBench(
            teacher=teacher, data=data, out=str(out), batch_size=batch_size, device=device,
            weights=str(weights) if weights else None, image_size=image_size,
            teacher_args=_codec_params(teacher_arg), format=format.value, codec=codec, layers=layers,
            limit=limit, views=views, repeats=repeats))
    except AttncacheError as exc:
        _fail(exc)
    typer.echo(json.dumps(result, indent=2))


@bench_app.command("codecs")
def bench_codecs(
    teacher: str = typer.Option("demo"), data: str = typer.Option("demo"), weights: Path | None = None,
    image_size: int | None = None, teacher_arg: list[str] = typer.Option([], "--teacher-arg"),
    layers: str = "all", limit: int | None = typer.Option(None, help="use the first N images (one view each)"),
    batch_size: int = typer.Option(8), device: str = typer.Option("cpu", help="where device_decode is measured"),
    codec: list[str] = typer.Option([], "--codec", help="NAME or NAME:KEY=VALUE,... (repeatable; default: a "
                                                        "sweep of every codec)"),
    repeats: int = typer.Option(2, help="timed passes; the best is reported"),
    as_json: bool = typer.Option(False, "--json", help="JSON only, no table"),
):
    """Bytes/view, ratio vs raw fp16, KL and error against the exact maps, encode/decode MB/s per core."""
    from attncache.bench import DEFAULT_BENCH_CODECS, CodecBench
    from attncache.bench import bench_codecs as run

    try:
        result = run(CodecBench(teacher=teacher, data=data, weights=str(weights) if weights else None,
                                image_size=image_size, teacher_args=_codec_params(teacher_arg), layers=layers,
                                limit=limit, batch_size=batch_size, device=device,
                                codecs=tuple(codec) or DEFAULT_BENCH_CODECS, repeats=repeats))
    except AttncacheError as exc:
        _fail(exc)
    if not as_json:
        _codec_table(result)
    typer.echo(json.dumps(result, indent=2))


def _codec_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['teacher']} @ {result['image_size']} px, {result['views']} views, raw fp16 "
                        f"{result['raw_fp16_bytes_per_view'] / 1e6:.2f} MB/view; MB/s raw-equivalent, per core "
                        f"except device decode ({result['device']})")
    columns = ("codec", "bytes/view", "ratio", "KL mean", "KL p99", "max |err|", "encode", "decompress",
               "decode", "device decode")
    for col in columns:
        table.add_column(col, justify="left" if col == "codec" else "right")
    for r in result["codecs"]:
        table.add_row(r["codec"], f"{r['bytes_per_view']:,}", f"{r['ratio_vs_raw_fp16']:.2f}x", f"{r['kl_mean']:.2e}",
                      f"{r['kl_p99']:.2e}", f"{r['max_abs_err']:.2e}", f"{r['encode_MBps_per_core']:.0f}",
                      f"{r['decompress_MBps_per_core']:.0f}", f"{r['decode_MBps_per_core']:.0f}",
                      f"{r['device_decode_MBps']:.0f}")
    Console(stderr=True).print(table)


@bench_app.command("train")
def bench_train(
    cache: str = typer.Option(..., help="train cache to read"), data: str | None = typer.Option(None),
    out: Path = typer.Option(Path("bench_out/train"), help="scratch directory (removed first)"),
    teacher: str | None = typer.Option(None, help="live-teacher baseline (default: the cache's architecture)"),
    weights: Path | None = typer.Option(None, help="live teacher weights (default: hub)"),
    mode: Mode = typer.Option(Mode.copy), layers: str | None = None, batch_size: int = typer.Option(16),
    steps: int = typer.Option(20, help="measured steps per rate"), warmup: int = typer.Option(3),
    workers: int = typer.Option(2), device: str = typer.Option("cpu"),
):
    """Images/s of cached training, live-teacher training, the student alone and the reader alone, in one run."""
    from attncache.bench import TrainBench
    from attncache.bench import bench_train as run

    try:
        result = run(TrainBench(cache=cache, data=data, out=str(out), teacher=teacher,
                                weights=str(weights) if weights else None, mode=mode.value, layers=layers,
                                batch_size=batch_size, steps=steps, warmup=warmup, workers=workers, device=device))
    except AttncacheError as exc:
        _fail(exc)
    typer.echo(json.dumps(result, indent=2))


@app.command()
def demo(out: Path = typer.Option(Path("demo_out"), help="where the demo writes its caches and runs"),
         epochs: int = typer.Option(30, help="training epochs of the teacher and of each student")):
    """End to end on the embedded demo set: train a tiny teacher -> extract train/val caches -> verify ->
    train scratch, copy and distill students from the cache -> results table."""
    from attncache.demo import run_demo

    try:
        run_demo(out, epochs)
    except AttncacheError as exc:
        _fail(exc)


def main() -> None:  # pragma: no cover
    sys.exit(app())

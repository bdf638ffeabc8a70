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
    payload: str = typer.Option("probs", help="probs (softmax maps) or logits (pre-softmax)"),
    codec: str = typer.Option("fp16", help="fp16 | fp32"),
    codec_arg: list[str] = typer.Option([], "--codec-arg", help="codec parameter KEY=VALUE (e.g. clevel=5)"),
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


@app.command()
def demo(out: Path = typer.Option(Path("demo_out"), help="where the demo writes its caches")):
    """End to end on the embedded demo set: tiny teacher -> extract (zarr and wds) -> inspect -> verify."""
    from attncache.demo import run_demo

    try:
        run_demo(out)
    except AttncacheError as exc:
        _fail(exc)


def main() -> None:  # pragma: no cover
    sys.exit(app())

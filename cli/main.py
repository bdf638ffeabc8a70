"""`attncache` command line: a thin typer skin over the Python API in `attncache`. It parses; the library owns the
defaults (an option marked FROM_CONFIG defaults to its config field's) and the checks (its errors name options by
their Python names, which `Command` prints as the command's flags).

Every error, a usage error included, is one line on stderr (`error: ...`) with exit code 2; an interrupted training
run exits 130 (SIGINT) or 143 (SIGTERM) after one line saying where its checkpoint is.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from attncache import __version__
from attncache.errors import RunInterrupted
from attncache.train.modes import MODES

from .options import (
    FROM_CONFIG,
    CacheDir,
    Command,
    Cutmix,
    Device,
    EraseCount,
    EraseMode,
    EraseProb,
    ImageSize,
    MixProb,
    MixSwitch,
    Mixup,
    OptionalTeacher,
    Pretrained,
    RandAugment,
    Recipe,
    StorageOption,
    Teacher,
    TeacherArg,
    TeacherDropPath,
    Weights,
    augmentation,
    one_line,
    storage_options,
    teacher_options,
    typed_only,
)


class OneLineErrors(TyperGroup):
    """Usage errors (a misspelt option value, a missing option) as one line, like every other error."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:  # click's usage errors (typer vendors click)
            if not standalone_mode:
                raise
            if type(exc).__name__ == "NoArgsIsHelpError":  # the help was printed: nothing wrong
                sys.exit(0)
            ctx = getattr(exc, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            typer.echo(one_line(exc.format_message().replace("Value error, ", "")) + hint, err=True)
            sys.exit(2)
        except typer.Abort:
            if not standalone_mode:
                raise
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


def _version(value: bool) -> None:
    if value:
        typer.echo(f"attncache {__version__}")
        raise typer.Exit()


app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cache a frozen ViT teacher's attention maps once; train students from the cache.")
bench_app = typer.Typer(cls=OneLineErrors, no_args_is_help=True, help="Measurements (see docs/benchmarks.md).")
app.add_typer(bench_app, name="bench")


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the version and exit")] = False):
    """Cache a frozen ViT teacher's attention maps once; train students from the cache."""


class StoreFormat(str, Enum):
    zarr = "zarr"
    wds = "wds"


class Split(str, Enum):
    train = "train"
    val = "val"


Mode = Enum("Mode", {name: name for name in MODES}, type=str)


@app.command(cls=Command.defaults_from("attncache.extract.config:ExtractConfig", "attncache.teacher:TeacherOptions"))
def extract(
    ctx: typer.Context,
    teacher: Teacher,
    data: str = typer.Option(..., help="image folder, webdataset shards (path or URL), or 'demo'"),
    out: str = typer.Option(..., help="cache directory or s3:// prefix (created; an unfinished one is resumed)"),
    format: StoreFormat = typer.Option(FROM_CONFIG, "--format", help="zarr (random access) or wds (streaming)"),
    views: int = typer.Option(FROM_CONFIG, help="views per image (train split)"),
    split: Split = typer.Option(FROM_CONFIG, help="train: random resized crops + flip; val: timm's eval crop"),
    layers: str = typer.Option(FROM_CONFIG, help="all | reference (first depth-3) | indices like 0,1,4-8"),
    payload: str | None = typer.Option(FROM_CONFIG, help="probs | logits | qk | inputs (default: the codec's)"),
    codec: str = typer.Option(FROM_CONFIG, help="fp16 | fp32 | qk | lowrank | sqrtq | logq | cls | inputs "
                                                "(docs/format.md)"),
    codec_arg: list[str] = typer.Option([], "--codec-arg", help="codec parameter KEY=VALUE (bits=8, rank=32, ...)"),
    batch_size: int = typer.Option(FROM_CONFIG, help="teacher batch size"),
    device: Device = FROM_CONFIG,
    amp: bool = typer.Option(FROM_CONFIG, help="bf16 autocast for the teacher on CUDA (maps still formed in fp32)"),
    weights: Weights = FROM_CONFIG,
    pretrained: Pretrained = FROM_CONFIG,
    image_size: ImageSize = FROM_CONFIG,
    teacher_arg: TeacherArg = [],  # noqa: B006 - typer reads the default, never mutates it
    seed: int = typer.Option(FROM_CONFIG, help="seed the view parameters are drawn from"),
    recipe: Recipe = None,
    randaugment: RandAugment = FROM_CONFIG,
    erase_prob: EraseProb = FROM_CONFIG,
    erase_mode: EraseMode = FROM_CONFIG,
    erase_count: EraseCount = FROM_CONFIG,
    mixup: Mixup = FROM_CONFIG,
    cutmix: Cutmix = FROM_CONFIG,
    mix_prob: MixProb = FROM_CONFIG,
    mix_switch: MixSwitch = FROM_CONFIG,
    teacher_drop_path: TeacherDropPath = FROM_CONFIG,
    records_per_shard: int | None = typer.Option(FROM_CONFIG, "--shard-records",
                                                 help="records per shard (default: ~256 MB raw)"),
    num_shards: int = typer.Option(FROM_CONFIG, help="independent jobs writing OUT (e.g. a SLURM array); see "
                                                     "--shard-index"),
    shard_index: int = typer.Option(FROM_CONFIG, help="this job's index, 0..num-shards-1: it writes the shards s "
                                                      "with s mod num-shards = index"),
    embed_images: bool = typer.Option(FROM_CONFIG, help="wds only: put the image bytes beside the maps"),
    workers: int = typer.Option(FROM_CONFIG, help="threads that decode and render images"),
    limit: int | None = typer.Option(FROM_CONFIG, help="only the first N images (smoke runs)"),
    repair: bool = typer.Option(FROM_CONFIG, help="re-hash every file of a finished cache; rewrite the shards that "
                                                  "differ"),
    stage: Path | None = typer.Option(FROM_CONFIG, help="--out URL: local staging directory (default under "
                                                        "~/.cache/attncache/stage)"),
    storage_option: StorageOption = [],  # noqa: B006
    ignore_free_space: bool = typer.Option(FROM_CONFIG, "--ignore-free-space", help="start even when OUT (or "
                                           "--stage) clearly has too little room for the estimated cache"),
    quiet: bool = typer.Option(False, help="no progress output"),
):
    """Run the teacher once over DATA and write its attention maps to OUT."""
    from attncache.distributed import World
    from attncache.extract import extract as run_extract
    from attncache.recipes import extract_config
    from attncache.teacher import parse_kwargs

    options = dict(
        teacher=teacher_options(teacher, weights, pretrained, image_size, teacher_arg), data=data,
        out=out, format=format.value, views=views, split=split.value, layers=layers, payload=payload,
        codec=codec, codec_params=parse_kwargs(codec_arg, "--codec-arg"), batch_size=batch_size, device=device,
        amp=amp, seed=seed, records_per_shard=records_per_shard, num_shards=num_shards, shard_index=shard_index,
        embed_images=embed_images, workers=workers,
        limit=limit, repair=repair, progress=not quiet, stage=str(stage) if stage else None,
        storage_options=storage_options(storage_option), ignore_free_space=ignore_free_space,
        **augmentation(randaugment, erase_prob, erase_mode, erase_count, mixup, cutmix, mix_prob, mix_switch,
                       teacher_drop_path))
    manifest = run_extract(extract_config(recipe, **typed_only(ctx, options, recipe)))
    if not World.env().is_main:  # torchrun: rank 0 speaks for the job
        return
    if manifest is None:
        typer.echo(f"wrote part {shard_index + 1}/{num_shards} of {out}; the cache is complete when every part is "
                   f"(the last to finish writes the manifest, or run `attncache merge {out}`)")
        return
    typer.echo(f"wrote {out}: {manifest['store']['records']} records in {len(manifest['store']['shards'])} shards")


@app.command(cls=Command)
def merge(cache: Path = typer.Argument(..., help="cache directory written by --num-shards jobs")):
    """Write the manifest of a cache whose shards independent jobs wrote, once all of them are finished."""
    from attncache.extract import merge as run_merge

    manifest = run_merge(cache)
    typer.echo(f"wrote {cache}: {manifest['store']['records']} records in {len(manifest['store']['shards'])} shards")


@app.command(cls=Command)
def inspect(cache: str = typer.Argument(..., help="cache directory or URL"),
            as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
            views: str | None = typer.Option(None, "--views", help="print these records' metadata as JSON lines "
                                             "(rows: 5, 0:10, 3,7,9)"),
            storage_option: StorageOption = [], cache_dir: CacheDir = None):  # noqa: B006
    """Summarise a cache: teacher, layers, codec, views, sizes; or print records' views and images as JSON."""
    from attncache import open_cache

    opened = open_cache(cache, storage_options(storage_option, cache_dir))
    if views is not None:
        for row in opened.parse_rows(views):
            typer.echo(json.dumps(opened.view_json(row)))
        return
    summary = opened.summary()
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"attncache {cache}", show_header=False)
    for k, v in summary.items():
        table.add_row(k, f"{v:,.2f}" if isinstance(v, float) else str(v))
    Console().print(table)


@app.command(cls=Command)
def verify(cache: str = typer.Argument(..., help="cache directory or URL"),
           quick: bool = typer.Option(False, help="sizes and every chunk's crc32c only (no sha256 of big files)"),
           manifest_sha256: str | None = typer.Option(None, help="the manifest's sha256 as published: pins every "
                                                                 "file"),
           storage_option: StorageOption = [], cache_dir: CacheDir = None):  # noqa: B006
    """Check every file against the manifest (sha256, or with --quick sizes and per-chunk crc32c), report any other
    file, decode each shard's first record; exit 2 naming the first bad file and record."""
    from attncache.tools.verify import verify_cache

    result = verify_cache(cache, storage_options(storage_option, cache_dir), quick=quick,
                          manifest_sha256=manifest_sha256)
    typer.echo(f"ok ({result['mode']}): {result['files']} files, {result['records']} records, "
               f"{result['chunks_checked']} chunk checksums, {result['bytes']:,} bytes; "
               f"manifest sha256 {result['manifest_sha256']}")


@app.command(cls=Command)
def copy(src: str = typer.Argument(..., help="cache directory or URL (https://, s3://, ...)"),
         dst: str = typer.Argument(..., help="directory or s3:// prefix (created; a partial copy is resumed)"),
         manifest_sha256: str | None = typer.Option(None, help="the source manifest's sha256 as published"),
         storage_option: StorageOption = [],  # noqa: B006
         dst_option: list[str] = typer.Option([], "--dst-option", help="option KEY=VALUE of DST (repeatable)"),
         quiet: bool = typer.Option(False, help="no per-file output")):
    """Copy a finished cache, checking every file's sha256 before it is written; the manifest goes last."""
    from attncache.tools.copy import copy_cache

    def said(path: str, copied: bool) -> None:
        if not quiet:
            typer.echo(f"{'copied' if copied else 'kept  '} {path}", err=True)

    result = copy_cache(src, dst, storage_options(storage_option), storage_options(dst_option),
                        manifest_sha256=manifest_sha256, on_file=said)
    typer.echo(f"copied {src} to {dst}: {result['copied']} files copied, {result['kept']} already there, "
               f"{result['bytes']:,} bytes; manifest sha256 {result['manifest_sha256']}")


@app.command(cls=Command.defaults_from("attncache.train.config:TrainConfig"))
def train(
    ctx: typer.Context,
    mode: Mode | None = typer.Option(None, help="copy | distill | gta (transfer), scratch | finetune (baselines): "
                                                "docs/training.md (default: the --recipe's)"),
    recipe: Recipe = None,
    out: Path = typer.Option(..., help="run directory (created; an unfinished run is resumed)"),
    cache: str | None = typer.Option(FROM_CONFIG, help="train cache: teacher maps + views"),
    data: str | None = typer.Option(FROM_CONFIG, help="train images joined to the cache by key (or live views)"),
    val_cache: str | None = typer.Option(FROM_CONFIG, help="val cache (--split val); copy mode needs it"),
    val_data: str | None = typer.Option(FROM_CONFIG, help="val images (joined to --val-cache, or timm's eval crops)"),
    storage_option: StorageOption = [],  # noqa: B006
    cache_dir: CacheDir = None,
    student: str | None = typer.Option(FROM_CONFIG, help="timm name (default: the teacher's architecture)"),
    student_args: list[str] = typer.Option([], "--student-arg", help="timm kwarg KEY=VALUE for --student"),
    teacher: OptionalTeacher = FROM_CONFIG,
    weights: Weights = FROM_CONFIG,
    pretrained: Pretrained = FROM_CONFIG,
    image_size: ImageSize = FROM_CONFIG,
    teacher_arg: TeacherArg = [],  # noqa: B006
    layers: str | None = typer.Option(FROM_CONFIG, help="transferred layers (default: first depth-3; gta: all "
                                                        "cached)"),
    epochs: int = typer.Option(FROM_CONFIG), batch_size: int = typer.Option(FROM_CONFIG),
    lr: float = typer.Option(FROM_CONFIG), min_lr: float = typer.Option(FROM_CONFIG),
    weight_decay: float = typer.Option(FROM_CONFIG),
    layer_decay: float | None = typer.Option(FROM_CONFIG, help="layer-wise lr decay, e.g. 0.75 (timm's)"),
    beta2: float = typer.Option(FROM_CONFIG), warmup_epochs: float = typer.Option(FROM_CONFIG),
    label_smoothing: float = typer.Option(FROM_CONFIG),
    distill_weight: float = typer.Option(FROM_CONFIG, help="weight of the attention distillation loss"),
    gta_weight: float = typer.Option(FROM_CONFIG, help="GTA lambda on the [CLS]-row logit L2 penalty"),
    drop_path: float = typer.Option(FROM_CONFIG), clip_grad: float | None = typer.Option(FROM_CONFIG),
    ema: float | None = typer.Option(FROM_CONFIG, help="EMA decay (e.g. 0.9999)"),
    randaugment: RandAugment = FROM_CONFIG, erase_prob: EraseProb = FROM_CONFIG,
    erase_mode: EraseMode = FROM_CONFIG, erase_count: EraseCount = FROM_CONFIG, mixup: Mixup = FROM_CONFIG,
    cutmix: Cutmix = FROM_CONFIG, mix_prob: MixProb = FROM_CONFIG, mix_switch: MixSwitch = FROM_CONFIG,
    teacher_drop_path: TeacherDropPath = FROM_CONFIG,
    seed: int = typer.Option(FROM_CONFIG), device: Device = FROM_CONFIG,
    amp: bool = typer.Option(FROM_CONFIG, help="bf16 autocast on CUDA (CPU runs fp32)"),
    workers: int = typer.Option(FROM_CONFIG, help="DataLoader worker processes"),
    max_steps: int | None = typer.Option(FROM_CONFIG, help="stop after N steps (checkpointed; resumable)"),
    save_every: int | None = typer.Option(FROM_CONFIG, help="also checkpoint every N steps"),
    log_every: int = typer.Option(FROM_CONFIG, help="steps per metrics.jsonl line"),
    quiet: bool = typer.Option(False, help="no progress output"),
    as_json: bool = typer.Option(False, "--json", help="print results.json instead of a short summary"),
):
    """Train a student from a cache (or a live teacher); re-running the same command resumes."""
    from attncache.distributed import World
    from attncache.recipes import train_config
    from attncache.teacher import parse_kwargs
    from attncache.train import train as run_train

    options = dict(
        mode=mode.value if mode else None, out=str(out), cache=cache, data=data, val_cache=val_cache,
        val_data=val_data, storage_options=storage_options(storage_option, cache_dir), student=student,
        student_args=parse_kwargs(student_args, "--student-arg"),
        teacher=teacher_options(teacher, weights, pretrained, image_size, teacher_arg), layers=layers,
        epochs=epochs, batch_size=batch_size, lr=lr, min_lr=min_lr, weight_decay=weight_decay,
        layer_decay=layer_decay, beta2=beta2, warmup_epochs=warmup_epochs, label_smoothing=label_smoothing,
        distill_weight=distill_weight, gta_weight=gta_weight, drop_path=drop_path, clip_grad=clip_grad, ema=ema,
        seed=seed, device=device, amp=amp, workers=workers, max_steps=max_steps, save_every=save_every,
        log_every=log_every, progress=not quiet,
        **augmentation(randaugment, erase_prob, erase_mode, erase_count, mixup, cutmix, mix_prob, mix_switch,
                       teacher_drop_path))
    try:
        results = run_train(train_config(recipe, **typed_only(ctx, options, recipe)))
    except RunInterrupted as exc:
        typer.echo(f"interrupted: {exc.message}", err=True)
        raise typer.Exit(128 + exc.signum) from None
    if World.env().is_main:  # torchrun: rank 0 speaks for the job
        typer.echo(json.dumps(results, indent=2) if as_json else _train_summary(results, out))


def _train_summary(results: dict, out: Path) -> str:
    from attncache.train.checkpoint import EMA_MODEL, METRICS, MODEL, RESULTS

    if "stopped_at_step" in results:
        return (f"stopped at step {results['stopped_at_step']} (epoch {results['epoch']}, --max-steps); checkpoint "
                f"in {out}; run the same command without --max-steps to go on")
    line = f"{results['mode']}: {results['steps']} steps, {results['epochs']} epochs"
    if "val_top1" in results:
        line += (f"; val top-1 {results['val_top1']:.1f} % (loss {results['val_loss']:.3f}, "
                 f"{results['val_images']} images)")
    if "val_top1_ema" in results:
        line += f", EMA {results['val_top1_ema']:.1f} %"
    ema = [EMA_MODEL] if (out / EMA_MODEL).is_file() else []
    return f"{line}\n  in {out}: " + ", ".join([MODEL, *ema, RESULTS, METRICS])


@app.command("eval", cls=Command)
def evaluate(
    checkpoint: Path = typer.Option(..., help="run directory (or its model/ema .safetensors)"),
    val_cache: str | None = typer.Option(None, help="default: the run's"),
    val_data: str | None = typer.Option(None, help="default: the run's"),
    ensemble_with: Path | None = typer.Option(None, help="a finetune run: also report the averaged ensemble"),
    ema: bool = typer.Option(False, help="evaluate the EMA weights"),
    storage_option: StorageOption = [],  # noqa: B006
    cache_dir: CacheDir = None,
    batch_size: int = typer.Option(64), device: Device = "cpu", workers: int = typer.Option(0),
    as_json: bool = typer.Option(False, "--json", help="print the results as JSON instead of a short summary"),
):
    """Top-1 of a trained student (and of its ensemble with a fine-tuned teacher)."""
    from attncache.eval import evaluate_run

    result = evaluate_run(str(checkpoint), val_cache, val_data, str(ensemble_with) if ensemble_with else None,
                          "ema" if ema else "model", device, batch_size, workers,
                          storage_options(storage_option, cache_dir))
    typer.echo(json.dumps(result, indent=2) if as_json else _eval_summary(result))


def _eval_summary(result: dict) -> str:
    lines = [f"{result['mode']} student ({result['weights']}): top-1 {result['student_top1']:.1f} % "
             f"(loss {result['student_loss']:.3f}, {result['student_images']} images)"]
    if "ensemble_top1" in result:
        lines.append(f"fine-tuned run: top-1 {result['finetuned_top1']:.1f} %; ensemble (mean of both runs' class "
                     f"probabilities): top-1 {result['ensemble_top1']:.1f} %")
    return "\n".join(lines)


@bench_app.command("extract", cls=Command.defaults_from("attncache.tools.bench.extract:ExtractBench"))
def bench_extract(
    out: Path = typer.Option(..., help="scratch directory (created empty, or one this benchmark made)"),
    teacher: Teacher = FROM_CONFIG, weights: Weights = FROM_CONFIG, pretrained: Pretrained = FROM_CONFIG,
    image_size: ImageSize = FROM_CONFIG, teacher_arg: TeacherArg = [],  # noqa: B006
    data: str = typer.Option(FROM_CONFIG), batch_size: int = typer.Option(FROM_CONFIG), device: Device = FROM_CONFIG,
    format: StoreFormat = typer.Option(FROM_CONFIG, "--format"), codec: str = typer.Option(FROM_CONFIG),
    codec_arg: list[str] = typer.Option([], "--codec-arg", help="codec parameter KEY=VALUE"),
    layers: str = typer.Option(FROM_CONFIG),
    limit: int | None = typer.Option(FROM_CONFIG, help="use the first N images"),
    views: int = typer.Option(FROM_CONFIG, help="views per image (more records per measured pass)"),
    repeats: int = typer.Option(FROM_CONFIG, help="passes per stage; the best is reported"),
):
    """Plain inference, teacher+capture, encode+write and extraction rates, measured in one run."""
    from attncache.teacher import parse_kwargs
    from attncache.tools.bench.extract import ExtractBench
    from attncache.tools.bench.extract import bench_extract as run

    result = run(ExtractBench(
        teacher=teacher_options(teacher, weights, pretrained, image_size, teacher_arg), data=data, out=str(out),
        batch_size=batch_size, device=device, format=format.value, codec=codec,
        codec_params=parse_kwargs(codec_arg, "--codec-arg"), layers=layers, limit=limit, views=views,
        repeats=repeats))
    typer.echo(json.dumps(result, indent=2))


@bench_app.command("codecs", cls=Command.defaults_from("attncache.tools.bench.codecs:CodecBench"))
def bench_codecs(
    teacher: Teacher = FROM_CONFIG, weights: Weights = FROM_CONFIG, pretrained: Pretrained = FROM_CONFIG,
    image_size: ImageSize = FROM_CONFIG, teacher_arg: TeacherArg = [],  # noqa: B006
    data: str = typer.Option(FROM_CONFIG), layers: str = typer.Option(FROM_CONFIG),
    limit: int | None = typer.Option(FROM_CONFIG, help="use the first N images (one view each)"),
    batch_size: int = typer.Option(FROM_CONFIG), device: Device = FROM_CONFIG,
    codec: list[str] = typer.Option([], "--codec", help="NAME or NAME:KEY=VALUE,... (repeatable; default: a "
                                                        "sweep of every codec)"),
    repeats: int = typer.Option(FROM_CONFIG, help="timed passes; the best is reported"),
    as_json: bool = typer.Option(False, "--json", help="JSON only, no table"),
):
    """Bytes/view, ratio vs raw fp16, KL and error against the exact maps, encode/decode MB/s per core."""
    from attncache.tools.bench.codecs import DEFAULT_BENCH_CODECS, CodecBench
    from attncache.tools.bench.codecs import bench_codecs as run

    result = run(CodecBench(teacher=teacher_options(teacher, weights, pretrained, image_size, teacher_arg),
                            data=data, layers=layers, limit=limit, batch_size=batch_size, device=device,
                            codecs=tuple(codec) or DEFAULT_BENCH_CODECS, repeats=repeats))
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


@bench_app.command("train", cls=Command.defaults_from("attncache.tools.bench.train:TrainBench",
                                                      "attncache.teacher:TeacherOptions"))
def bench_train(
    cache: str = typer.Option(..., help="train cache to read"), data: str | None = typer.Option(FROM_CONFIG),
    out: Path = typer.Option(FROM_CONFIG, help="scratch directory (created empty, or one this benchmark made)"),
    teacher: OptionalTeacher = FROM_CONFIG, weights: Weights = FROM_CONFIG, pretrained: Pretrained = FROM_CONFIG,
    image_size: ImageSize = FROM_CONFIG, teacher_arg: TeacherArg = [],  # noqa: B006
    mode: Mode = typer.Option(FROM_CONFIG), layers: str | None = typer.Option(FROM_CONFIG),
    batch_size: int = typer.Option(FROM_CONFIG),
    steps: int = typer.Option(FROM_CONFIG, help="measured steps per rate"), warmup: int = typer.Option(FROM_CONFIG),
    workers: int = typer.Option(FROM_CONFIG), device: Device = FROM_CONFIG,
    repeats: int = typer.Option(FROM_CONFIG, help="timed windows per rate; the best is reported"),
):
    """Images/s of cached training, live-teacher training, the student alone and the reader alone, in one run."""
    from attncache.tools.bench.train import TrainBench
    from attncache.tools.bench.train import bench_train as run

    live = teacher_options(teacher, weights, pretrained, image_size, teacher_arg)  # default: the cache's model
    result = run(TrainBench(cache=cache, data=data, out=str(out), teacher=live, mode=mode.value, layers=layers,
                            batch_size=batch_size, steps=steps, warmup=warmup, workers=workers, device=device,
                            repeats=repeats))
    typer.echo(json.dumps(result, indent=2))


@app.command(cls=Command)
def viz(
    out: Path = typer.Option(..., help="PNG to write"),
    cache: str | None = typer.Option(None, help="a cache: draw one of its views' maps"),
    key: str | None = typer.Option(None, help="the image key in --cache (default: its first)"),
    view: int = typer.Option(0, help="which view of the image"),
    data: str | None = typer.Option(None, help="the cache's images (not needed when it embeds them)"),
    image: Path | None = typer.Option(None, help="an image file for a live --teacher (timm's eval view)"),
    teacher: OptionalTeacher = None, weights: Weights = None, pretrained: Pretrained = True,
    image_size: ImageSize = None, teacher_arg: TeacherArg = [],  # noqa: B006
    checkpoint: Path | None = typer.Option(None, help="a training run: its student's own attention beside"),
    layers: str | None = typer.Option(None, help="layers to draw (default: all in the cache / the teacher)"),
    heads: str | None = typer.Option(None, help="heads to draw, e.g. 0-3 (default: all)"),
    query: str = typer.Option("cls", help="cls, or a patch X,Y whose attention row is drawn"),
    storage_option: StorageOption = [],  # noqa: B006
    cache_dir: CacheDir = None,
):
    """A layer x head grid of attention rows over the rendered view (a cached view, or a live teacher)."""
    from attncache.tools.viz import visualize

    path = visualize(out, cache=cache, key=key, view=view, data=data, image=str(image) if image else None,
                     teacher=teacher_options(teacher, weights, pretrained, image_size, teacher_arg),
                     checkpoint=str(checkpoint) if checkpoint else None, layers=layers, heads=heads,
                     query=query, storage_options=storage_options(storage_option, cache_dir))
    typer.echo(f"wrote {path}")


@app.command(cls=Command)
def plot(run: list[Path] = typer.Argument(..., help="training run directories (each read from its metrics.jsonl)"),
         out: Path = typer.Option(..., help="PNG to write")):
    """Loss and val top-1 curves of training runs in one PNG, one colour per run."""
    from attncache.tools.plot import plot_runs

    path = plot_runs(run, out)
    typer.echo(f"wrote {path}")


@app.command(cls=Command)
def demo(out: Path = typer.Option(Path("demo_out"), help="where the demo writes its caches and runs"),
         epochs: int = typer.Option(30, help="training epochs of the teacher and of each student")):
    """End to end on the built-in images: tiny teacher -> caches -> verify -> students from the cache -> table."""
    from attncache.tools.demo import run_demo

    run_demo(out, epochs)


@app.command(cls=Command.defaults_from("attncache.tools.costs:PlanInputs"))
def plan(
    teacher: Teacher = "mae_vitl", image_size: ImageSize = None, teacher_arg: TeacherArg = [],  # noqa: B006
    depth: int | None = typer.Option(None, help="explicit geometry instead of --teacher: blocks"),
    heads: int | None = typer.Option(None, help="explicit geometry: attention heads"),
    embed_dim: int | None = typer.Option(None, help="explicit geometry: width D"),
    patch: int | None = typer.Option(None, help="explicit geometry: patch size"),
    prefix_tokens: int = typer.Option(1, help="explicit geometry: [CLS] + register tokens"),
    mlp_ratio: float = typer.Option(4.0, help="explicit geometry: MLP hidden units / D"),
    student: str | None = typer.Option(None, help="student alias or timm name (default: the teacher's architecture)"),
    layers: str = typer.Option(FROM_CONFIG, help="captured layers, as extract (reference: the first depth-3)"),
    codec: list[str] = typer.Option(["all"], "--codec", help="NAME or NAME:KEY=VALUE,... (repeatable); all: every "
                                                             "codec at its defaults"),
    images: int = typer.Option(FROM_CONFIG, help="images in the dataset (default: ImageNet-1k train)"),
    views: int = typer.Option(FROM_CONFIG, help="cached views per image"),
    epochs: int = typer.Option(FROM_CONFIG, help="epochs of one student run"),
    images_per_s: float = typer.Option(FROM_CONFIG, help="the student's training rate per GPU, maps in hand"),
    gpus_per_node: int = typer.Option(FROM_CONFIG),
    read_GBps_per_node: float | None = typer.Option(FROM_CONFIG, "--read-bandwidth", help="GB/s a node can read "
                                                    "the cache at (default: unlimited)"),
    ratio: float | None = typer.Option(FROM_CONFIG, help="compressed / raw field bytes (default: the measured "
                                                         "table)"),
    bits_per_element: float | None = typer.Option(FROM_CONFIG, help="compressed bits per stored field element"),
    ratio_from: Path | None = typer.Option(None, help="a local cache: use its measured ratio (and its codec)"),
    markdown: bool = typer.Option(False, "--markdown", help="the table as markdown"),
    as_json: bool = typer.Option(False, "--json", help="JSON only, no table"),
):
    """The cost on paper: cache bytes, read bandwidth, FLOPs saved and decoded, break-even student runs
    (docs/costs.md)."""
    from attncache.teacher import parse_kwargs
    from attncache.tools import costs

    geometry = (costs.explicit_geometry(depth, heads, embed_dim, patch, image_size, prefix_tokens, mlp_ratio)
                or costs.timm_geometry(teacher, image_size, parse_kwargs(teacher_arg)))
    if ratio_from is not None:
        ratio, codec = costs.ratio_from_cache(ratio_from, codec, ratio, bits_per_element)
    result = costs.plan(costs.PlanInputs(
        geometry, layers, costs.expand_codecs(codec),
        student=costs.timm_geometry(student, geometry.image_size) if student else None, images=images,
        views=views, epochs=epochs, images_per_s=images_per_s, gpus_per_node=gpus_per_node,
        read_GBps_per_node=read_GBps_per_node, ratio=ratio, bits_per_element=bits_per_element))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    from rich.console import Console

    Console().print(costs.plan_table(result, markdown))


def main() -> None:  # pragma: no cover
    app()

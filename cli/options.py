"""Options shared by several commands, declared once (flags, help, defaults), and their conversion to the API's
objects. A command lists the ones it takes in its signature; what they mean lives here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

# The one set of teacher options (extract, train, bench): --teacher --weights --[no-]pretrained --image-size
# --teacher-arg.
TEACHER_HELP = "alias (mae_vitl, dinov2_vits14, demo, ...) or any timm ViT name"
Teacher = Annotated[str, typer.Option("--teacher", help=TEACHER_HELP)]
OptionalTeacher = Annotated[str | None, typer.Option("--teacher", help=f"{TEACHER_HELP}; a live teacher")]
Weights = Annotated[Path | None, typer.Option("--weights", help="local weights: .safetensors, timm or MAE .pth")]
Pretrained = Annotated[bool, typer.Option("--pretrained/--no-pretrained",
                                          help="download hub weights when --weights is not given")]
ImageSize = Annotated[int | None, typer.Option("--image-size", help="teacher input size (default: the model's)")]
TeacherArg = Annotated[list[str], typer.Option("--teacher-arg", help="timm kwarg KEY=VALUE (patch_size=8, ...)")]

# Remote caches
StorageOption = Annotated[list[str], typer.Option(
    "--storage-option", help="option KEY=VALUE of a remote cache (repeatable): fsspec's (endpoint_url, anon, key, "
                             "...) and attncache's retries, backoff, cache_max_bytes (docs/sharing.md)")]
CacheDir = Annotated[Path | None, typer.Option(
    "--cache-dir", help="remote caches: keep their files here once downloaded and verified (read-through, bounded "
                        "by cache_max_bytes; default $ATTNCACHE_CACHE_DIR)")]

Device = Annotated[str, typer.Option("--device", help="cpu | cuda | cuda:N (teacher, student and decoding)")]


def teacher_options(name: str | None, weights: Path | None, pretrained: bool, image_size: int | None,
                    teacher_arg: list[str]):
    from attncache.teacher import TeacherOptions, parse_kwargs

    return TeacherOptions(name=name, weights=str(weights) if weights else None, pretrained=pretrained,
                          image_size=image_size, args=parse_kwargs(teacher_arg))


def storage_options(pairs: list[str], cache_dir: Path | None = None) -> dict:
    from attncache.teacher import parse_kwargs

    options = parse_kwargs(pairs, "--storage-option")
    return {**options, "cache_dir": str(cache_dir)} if cache_dir else options


# Recipes and view augmentation (extract: the cached views; train: live views, or a check against the cache's)
Recipe = Annotated[str | None, typer.Option(
    "--recipe", help="at-copy | at-distill: the reference recipe's values for every option not given "
                     "(docs/training.md)")]
RandAugment = Annotated[str | None, typer.Option(
    "--randaugment", help="timm RandAugment string, e.g. rand-m9-mstd0.5-inc1 ('none': off)")]
EraseProb = Annotated[float, typer.Option("--erase-prob", help="random erasing probability per view")]
EraseMode = Annotated[str, typer.Option("--erase-mode", help="pixel (per-pixel noise) | const (zeros)")]
EraseCount = Annotated[int, typer.Option("--erase-count", help="erasing boxes per erased view")]
Mixup = Annotated[float, typer.Option("--mixup", help="mixup alpha (0: off)")]
Cutmix = Annotated[float, typer.Option("--cutmix", help="cutmix alpha (0: off)")]
MixProb = Annotated[float, typer.Option("--mix-prob", help="probability that a view is mixed")]
MixSwitch = Annotated[float, typer.Option("--mix-switch", help="with mixup and cutmix: probability of cutmix")]
TeacherDropPath = Annotated[float, typer.Option(
    "--teacher-drop-path", help="the teacher runs with per-view drop-path masks at this rate (stored; the "
                                "student's transferred blocks reuse them)")]

# The options a recipe presets: when --recipe is given, these take the recipe's value unless typed.
RECIPE_OPTIONS = ("mode", "epochs", "warmup_epochs", "lr", "min_lr", "weight_decay", "beta2", "layer_decay",
                  "drop_path", "ema", "label_smoothing", "randaugment", "erase_prob", "erase_mode", "erase_count",
                  "mixup", "cutmix", "mix_prob", "mix_switch", "teacher_drop_path")


def augmentation(randaugment: str | None, erase_prob: float, erase_mode: str, erase_count: int, mixup: float,
                 cutmix: float, mix_prob: float, mix_switch: float, teacher_drop_path: float) -> dict:
    """The augmentation options as the API's flat keyword arguments."""
    return {"randaugment": None if randaugment in (None, "", "none") else randaugment, "erase_prob": erase_prob,
            "erase_mode": erase_mode, "erase_count": erase_count, "mixup": mixup, "cutmix": cutmix,
            "mix_prob": mix_prob, "mix_switch": mix_switch, "teacher_drop_path": teacher_drop_path}


def typed_only(ctx: typer.Context, options: dict, recipe: str | None) -> dict:
    """With a recipe, drop the recipe-preset options the user did not type (their defaults would mask it)."""
    if recipe is None:
        return options
    return {k: v for k, v in options.items()
            if k not in RECIPE_OPTIONS or ctx.get_parameter_source(k).name != "DEFAULT"}

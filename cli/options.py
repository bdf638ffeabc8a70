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
StorageOption = Annotated[list[str], typer.Option("--storage-option",
                                                  help="fsspec option KEY=VALUE of a remote cache (repeatable)")]

Device = Annotated[str, typer.Option("--device", help="cpu | cuda | cuda:N (teacher, student and decoding)")]


def teacher_options(name: str | None, weights: Path | None, pretrained: bool, image_size: int | None,
                    teacher_arg: list[str]):
    from attncache.teacher import TeacherOptions, parse_kwargs

    return TeacherOptions(name=name, weights=str(weights) if weights else None, pretrained=pretrained,
                          image_size=image_size, args=parse_kwargs(teacher_arg))


def storage_options(pairs: list[str]) -> dict:
    from attncache.teacher import parse_kwargs

    return parse_kwargs(pairs, "--storage-option")

"""Options shared by several commands, declared once (flags, help), and their conversion to the API's objects. A
command lists the ones it takes in its signature; what they mean lives here. Their defaults are the library's
(`FROM_CONFIG`), and so are the checks of their values: `Command` fills in the one and prints the other's errors
with the options spelled as flags."""

from __future__ import annotations

import dataclasses
from importlib import import_module
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from attncache.errors import AttncacheError


def one_line(message: str) -> str:
    return "error: " + " ".join(str(message).split())


# -- commands: defaults from the library's configs, its errors in flags -------------------------------------------


class _FromConfig:
    def __repr__(self) -> str:
        return "FROM_CONFIG"


# The default of an option that a config field owns (same name: `--batch-size` is `batch_size`): the field's
# default, filled in by `Command` when the command runs, so the CLI cannot drift from the library.
FROM_CONFIG: Any = _FromConfig()


def config_defaults(*configs) -> dict[str, Any]:
    """Option name -> default, of config dataclasses (classes or instances; the first to name an option wins). A
    nested config's fields are options of their own names (`augment.mixup` is `mixup`), its `name` the option named
    after the nested field (`teacher.name` is `teacher`), as `Command.flag` spells them."""
    defaults = {}
    for config in configs:
        for f in dataclasses.fields(config):
            value = _default(config, f)
            if dataclasses.is_dataclass(value):
                inner = config_defaults(value)
                if "name" in inner:
                    inner[f.name] = inner.pop("name")
                for name, default in inner.items():
                    defaults.setdefault(name, default)
            elif value is not dataclasses.MISSING:
                defaults.setdefault(f.name, value)
    return defaults


def _default(config, f: dataclasses.Field):
    if not isinstance(config, type):
        return getattr(config, f.name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


class Command(TyperCommand):
    """A command that prints the library's errors as one line, the options they name (`batch_size`) spelled as its
    flags (`--batch-size`). `Command.defaults_from(...)`: also one whose FROM_CONFIG options take their config
    fields' defaults, when the command is run or its help shown (not at import: the configs import torch, which
    `attncache --help` should not wait for)."""

    configs: tuple[str, ...] = ()  # "module:Class" of each config whose defaults this command's options take

    @classmethod
    def defaults_from(cls, *configs: str) -> type[Command]:
        return type(cls.__name__, (cls,), {"configs": configs})

    def make_context(self, info_name, args, parent=None, **extra):
        self.fill_defaults()
        return super().make_context(info_name, args, parent, **extra)

    def field_defaults(self) -> dict[str, Any]:
        """The defaults of this command's configs, by option name (importing them)."""
        return config_defaults(*(getattr(import_module(m), n) for m, n in (c.split(":") for c in self.configs)))

    def fill_defaults(self) -> None:
        if not any(p.default is FROM_CONFIG for p in self.params):
            return
        defaults = self.field_defaults()
        for p in self.params:
            if p.default is FROM_CONFIG:
                if p.name not in defaults:
                    raise LookupError(f"`{self.name}` option {p.name!r}: no field of {self.configs} by that name")
                p.default = defaults[p.name]

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AttncacheError as exc:
            typer.echo(one_line(exc.spelled(self.flag)), err=True)
            raise typer.Exit(2) from None

    def flag(self, option: str) -> str | None:
        """This command's spelling of a library option (`batch_size`: `--batch-size`, `teacher.weights`:
        `--weights`, `teacher.name`: `--teacher`); None where it has no such option."""
        head, _, leaf = option.rpartition(".")
        name = head.rpartition(".")[2] if leaf == "name" and head else leaf
        param = next((p for p in self.params if p.name == name), None)
        if param is None:
            return None
        if param.param_type_name == "argument":
            return param.metavar or param.name.upper()  # as docs/cli.md names arguments (CACHE)
        return max(param.opts, key=len)


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


def augmentation(randaugment: str | None, erase_prob: float, erase_mode: str, erase_count: int, mixup: float,
                 cutmix: float, mix_prob: float, mix_switch: float, teacher_drop_path: float) -> dict:
    """The augmentation options as the API's flat keyword arguments."""
    return {"randaugment": None if randaugment in (None, "", "none") else randaugment, "erase_prob": erase_prob,
            "erase_mode": erase_mode, "erase_count": erase_count, "mixup": mixup, "cutmix": cutmix,
            "mix_prob": mix_prob, "mix_switch": mix_switch, "teacher_drop_path": teacher_drop_path}


def typed_only(ctx: typer.Context, options: dict, recipe: str | None) -> dict:
    """With a recipe, drop the options it presets that the user did not type (their defaults would mask it)."""
    if recipe is None:
        return options
    from attncache.recipes import get_recipe

    presets = get_recipe(recipe).presets
    return {k: v for k, v in options.items() if k not in presets or ctx.get_parameter_source(k).name != "DEFAULT"}

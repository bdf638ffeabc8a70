"""Teacher registry: aliases for the usual attention-transfer teachers, timm construction, what a cache records.

A teacher is a frozen timm `VisionTransformer` whose blocks use timm's standard `Attention` (softmax of
`(q * scale) kᵀ`), the computation the capture hooks and the students assume. Other attention variants (differential
attention, rotary embeddings, ...) compute something else and are refused by name. Its *geometry* (layers, heads,
tokens, image size, patch, prefix tokens) and normalisation are what a cache records, so a student of the same
architecture can be built later.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from ..errors import AttncacheError, CacheFormatError
from .capture import CaptureShape
from .hub import require_hub
from .weights import load_state, read_state_dict, state_dict_sha256

# alias -> timm model name (with pretrained tag). Any other timm ViT name is accepted as is.
TEACHER_ALIASES: dict[str, str] = {
    "mae_vitb": "vit_base_patch16_224.mae",
    "mae_vitl": "vit_large_patch16_224.mae",
    "mae_vith": "vit_huge_patch14_224.mae",
    "dino_vits16": "vit_small_patch16_224.dino",
    "dino_vitb16": "vit_base_patch16_224.dino",
    "dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_vitb14": "vit_base_patch14_dinov2.lvd142m",
    "dinov2_vitl14": "vit_large_patch14_dinov2.lvd142m",
    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2.lvd142m",
}

# The embedded demo teacher: a tiny ViT that runs in seconds on a CPU (random init unless weights are given).
DEMO_TEACHER = dict(
    model="vit_tiny_patch16_224", image_size=32, args=dict(patch_size=8, depth=4, embed_dim=64, num_heads=4)
)
TEACHER_ALIASES["demo"] = DEMO_TEACHER["model"]


@dataclass(frozen=True)
class TeacherOptions:
    """The one set of teacher options every command takes: `--teacher --weights --[no-]pretrained --image-size
    --teacher-arg`. Weights come from `weights` (safetensors, timm or MAE .pth) when given, else from the hub when
    `pretrained`, else a seeded random init (tests, demo)."""

    name: str | None = None  # alias or timm name; None where a command takes the teacher from a cache
    weights: str | None = None
    pretrained: bool = True
    image_size: int | None = None
    args: dict = field(default_factory=dict)

    def build(self, device: str | torch.device = "cpu") -> tuple[nn.Module, TeacherSpec]:
        return build_teacher(self, device)


@dataclass(frozen=True)
class TeacherSpec:
    """Everything a cache records about its teacher; enough to rebuild the same architecture."""

    model: str  # timm name, pretrained tag included
    image_size: int
    patch_size: int
    depth: int
    num_heads: int
    embed_dim: int
    num_prefix_tokens: int  # [CLS] + registers
    num_tokens: int  # N = prefix + patches
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float
    weights_sha256: str  # canonical hash of the state dict actually loaded
    weights_source: str  # "hub", "file:<name>", or "random"
    model_args: dict = field(default_factory=dict)  # extra timm kwargs (patch_size, depth, ...)

    def capture_shape(self, num_layers: int) -> CaptureShape:
        """Geometry of one record's capture of `num_layers` layers (what a codec's fields are sized from)."""
        return CaptureShape(num_layers, self.num_heads, self.num_tokens, self.embed_dim // self.num_heads)

    def to_json(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_json(cls, d: dict) -> TeacherSpec:
        names = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or set(d) != names:
            got = set(d) if isinstance(d, dict) else set()
            raise CacheFormatError(f"manifest: teacher: fields {sorted(names - got)} missing, "
                                   f"{sorted(got - names)} unknown")
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


def resolve_name(name: str) -> str:
    return TEACHER_ALIASES.get(name, name)


def parse_kwargs(pairs: list[str] | None, flag: str = "--teacher-arg") -> dict:
    """`KEY=VALUE` strings -> kwargs; values parsed as int, float, bool or left as strings."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise AttncacheError(f"{flag} {pair!r}: expected KEY=VALUE")
        key, raw = pair.split("=", 1)
        out[key.strip()] = _parse_scalar(raw.strip())
    return out


def _parse_scalar(raw: str):
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def build_teacher(opts: TeacherOptions, device: str | torch.device = "cpu") -> tuple[nn.Module, TeacherSpec]:
    """Create a frozen timm ViT teacher and describe it."""
    import timm

    if not opts.name:
        raise AttncacheError("pass `teacher.name` (an alias or a timm ViT name)")
    model_name = resolve_name(opts.name)
    args = dict(opts.args)
    image_size = opts.image_size
    if opts.name == "demo":
        args = {**DEMO_TEACHER["args"], **args}
        image_size = image_size or DEMO_TEACHER["image_size"]
    if not timm.is_model(model_name.split(".")[0]):
        known = ", ".join(sorted(TEACHER_ALIASES))
        raise AttncacheError(f"unknown teacher {opts.name!r}: not an alias ({known}) nor a timm model name")
    if image_size is not None:
        args["img_size"] = image_size

    use_hub = opts.pretrained and opts.weights is None and opts.name != "demo"
    if use_hub:
        require_hub(model_name, "`teacher.weights`")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # a random-init teacher (tests, demo) is the same teacher on every run
            model = timm.create_model(model_name, pretrained=use_hub, num_classes=0, **args)
    except (OSError, RuntimeError, ValueError, TypeError, AssertionError) as exc:  # bad kwargs (TypeError), ...
        hint = " (offline? pass `teacher.weights` FILE)" if use_hub else ""
        detail = " ".join(str(exc).split())[:300]
        raise AttncacheError(f"cannot build teacher {model_name!r} with {args}: {detail}{hint}") from exc
    check_standard_vit(model, f"teacher {model_name!r}")

    source = "hub" if use_hub else "random"
    if opts.weights is not None:
        weights = "`teacher.weights`"
        load_state(model, read_state_dict(opts.weights, weights), f"{weights} {opts.weights}")
        source = f"file:{Path(opts.weights).name}"
    model.eval().requires_grad_(False).to(device)
    return model, describe(model, model_name, source, {k: v for k, v in args.items() if k != "img_size"})


def check_standard_vit(model: nn.Module, what: str) -> None:
    """A timm VisionTransformer whose every block uses timm's standard `Attention`, nothing that merely looks
    like it (a subclass or a variant with the same attribute names computes other maps)."""
    from timm.layers import Attention
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise AttncacheError(f"{what} is not a timm VisionTransformer ({type(model).__name__})")
    for i, blk in enumerate(model.blocks):
        attn = getattr(blk, "attn", None)
        if type(attn) is not Attention:
            raise AttncacheError(f"{what} block {i}: attention {type(attn).__name__} is not timm's standard "
                                 "Attention (softmax of q·kᵀ); attention transfer supports standard ViT attention")


GEOMETRY = ("image_size", "patch_size", "depth", "num_heads", "num_tokens", "num_prefix_tokens")


def geometry_differences(a: dict, b: dict, keys=GEOMETRY) -> list[str]:
    """`field a vs b` for each geometry field where two `geometry()` dicts (or `vars(TeacherSpec)`) differ."""
    return [f"{f} {a[f]} vs {b[f]}" for f in keys if a[f] != b[f]]


def geometry(model: nn.Module, model_name: str) -> dict:
    """Layers, heads, tokens and sizes of a timm ViT (cheap: no weight hashing)."""
    grid = model.patch_embed.grid_size
    patch = model.patch_embed.patch_size
    image_size = model.patch_embed.img_size
    if grid[0] != grid[1] or patch[0] != patch[1] or image_size[0] != image_size[1]:
        raise AttncacheError(f"teacher {model_name!r}: only square images and patches are supported")
    if image_size[0] % patch[0]:  # timm's patch conv would silently drop the remainder pixels
        raise AttncacheError(f"teacher {model_name!r}: image size {image_size[0]} is not a multiple of its "
                             f"patch size {patch[0]}")
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    return dict(image_size=int(image_size[0]), patch_size=int(patch[0]), depth=len(model.blocks),
                num_heads=int(model.blocks[0].attn.num_heads), embed_dim=int(model.embed_dim),
                num_prefix_tokens=prefix, num_tokens=prefix + int(grid[0] * grid[1]))


def describe(model: nn.Module, model_name: str, weights_source: str, model_args: dict) -> TeacherSpec:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return TeacherSpec(
        model=model_name,
        **geometry(model, model_name),
        mean=tuple(float(x) for x in cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(float(x) for x in cfg.get("std", (0.229, 0.224, 0.225))),
        interpolation=str(cfg.get("interpolation", "bicubic")),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
        weights_sha256=state_dict_sha256(model),
        weights_source=weights_source,
        model_args=model_args,
    )

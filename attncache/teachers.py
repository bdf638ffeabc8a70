"""Teacher registry: aliases for the usual attention-transfer teachers, timm construction and weight loading.

A teacher is always a frozen timm VisionTransformer. Its *geometry* (layers, heads, tokens, image size, patch,
prefix tokens) and normalisation are what a cache records, so a student of the same architecture can be built later.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .codecs.base import CaptureShape
from .errors import AttncacheError

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

# Keys of a pretraining checkpoint that a frozen ViT teacher does not use (MAE decoder, mask token, heads).
_IGNORED_PREFIXES = ("decoder", "mask_token", "head.", "fc_norm.", "head_drop.")


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
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


def resolve_name(name: str) -> str:
    return TEACHER_ALIASES.get(name, name)


def parse_teacher_args(pairs: list[str] | None) -> dict:
    """`KEY=VALUE` strings -> timm kwargs; values parsed as int, float, bool or left as strings."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise AttncacheError(f"--teacher-arg {pair!r}: expected KEY=VALUE")
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


def build_teacher(
    name: str,
    *,
    image_size: int | None = None,
    weights: str | Path | None = None,
    pretrained: bool = True,
    teacher_args: dict | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, TeacherSpec]:
    """Create a frozen timm ViT teacher and describe it.

    Weights come from `weights` (safetensors, a timm checkpoint, or an MAE `{'model': ...}` .pth) when given,
    else from the hub when `pretrained`, else random init (tests, demo).
    """
    import timm

    model_name = resolve_name(name)
    args = dict(teacher_args or {})
    if name == "demo":
        args = {**DEMO_TEACHER["args"], **args}
        image_size = image_size or DEMO_TEACHER["image_size"]
    if not timm.is_model(model_name.split(".")[0]):
        known = ", ".join(sorted(TEACHER_ALIASES))
        raise AttncacheError(f"unknown teacher {name!r}: not an alias ({known}) nor a timm model name")
    if image_size is not None:
        args["img_size"] = image_size

    use_hub = pretrained and weights is None and name != "demo"
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # a random-init teacher (tests, demo) is the same teacher on every run
            model = timm.create_model(model_name, pretrained=use_hub, num_classes=0, **args)
    except (OSError, RuntimeError, ValueError, TypeError) as exc:  # hub unreachable, bad kwargs (TypeError)...
        hint = " (offline? pass --weights FILE)" if use_hub else ""
        raise AttncacheError(f"cannot build teacher {model_name!r} with {args}: {exc}{hint}") from exc
    _check_is_vit(model, model_name)

    source = "hub" if use_hub else "random"
    if weights is not None:
        load_weights(model, weights)
        source = f"file:{Path(weights).name}"
    model.eval().requires_grad_(False).to(device)
    return model, describe(model, model_name, source, {k: v for k, v in args.items() if k != "img_size"})


def _check_is_vit(model: nn.Module, name: str) -> None:
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "patch_embed"):
        raise AttncacheError(f"teacher {name!r} is not a timm VisionTransformer (no .blocks / .patch_embed)")
    for i, blk in enumerate(blocks):
        attn = getattr(blk, "attn", None)
        if attn is None or not all(hasattr(attn, a) for a in ("qkv", "q_norm", "k_norm", "scale", "num_heads")):
            raise AttncacheError(f"teacher {name!r} block {i}: unsupported attention module {type(attn).__name__}")


GEOMETRY = ("image_size", "patch_size", "depth", "num_heads", "num_tokens", "num_prefix_tokens")


def geometry_differences(a: dict, b: dict, fields=GEOMETRY) -> list[str]:
    """`field a vs b` for each geometry field where two `geometry()` dicts (or `vars(TeacherSpec)`) differ."""
    return [f"{f} {a[f]} vs {b[f]}" for f in fields if a[f] != b[f]]


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


def state_dict_sha256(model: nn.Module) -> str:
    """A hash of the weights themselves (names, shapes, dtypes, bytes), independent of the file they came from."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read weights without unpickling arbitrary objects: safetensors, or torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise AttncacheError(f"--weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the file's fault
        raise AttncacheError(f"--weights {path}: cannot read weights ({exc})") from exc
    # Unwrap the usual checkpoint containers: MAE {'model': ...}, Lightning {'state_dict': ...}, EMA.
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AttncacheError(f"--weights {path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model: nn.Module, path: str | Path) -> None:
    load_state(model, read_state_dict(path), f"--weights {path}")


def load_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load a ViT body's weights (heads and MAE decoder ignored) through timm's remapping; errors name `where`."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = {k: v for k, v in state.items() if not k.startswith(_IGNORED_PREFIXES)}
    # timm's filter would silently resample a patch embedding of another patch size: that is another teacher.
    theirs, ours = state.get("patch_embed.proj.weight"), model.patch_embed.proj.weight
    if theirs is not None and tuple(theirs.shape) != tuple(ours.shape):
        raise AttncacheError(f"{where}: does not match the teacher: patch embedding "
                             f"{tuple(theirs.shape)} vs {tuple(ours.shape)} (another patch size or width?)")
    try:
        state = checkpoint_filter_fn(state, model)  # timm's own remapping (pos-embed resize, original layouts)
    except Exception as exc:  # noqa: BLE001
        raise AttncacheError(f"{where}: does not fit {type(model).__name__}: {exc}") from exc
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        detail = " ".join(str(exc).split())
        raise AttncacheError(f"{where}: does not match the teacher architecture "
                             f"({detail[:300]}{'...' if len(detail) > 300 else ''})") from exc
    missing = [k for k in missing if not k.startswith(_IGNORED_PREFIXES)]
    if missing or unexpected:
        raise AttncacheError(
            f"{where}: does not match the teacher architecture "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]})"
        )

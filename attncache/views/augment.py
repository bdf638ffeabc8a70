"""The augmentation ops of a view, as explicit parameters, applied with the ecosystem's own functions.

- `AugmentOp`: one RandAugment op as it was applied: timm's op name, the signed magnitude it was drawn at, the
  arguments timm's level function turned that into, the fill colour and the resampling filter. Replay calls
  `timm.data.auto_augment.NAME_TO_OP[name](img, *args, fillcolor=fill, resample=resample)` on the PIL view.
- `DropPathMask`: the per-block keep mask of stochastic depth the teacher ran with (the reference distill recipe
  shares the student's drop-path masks with the teacher); it changes no pixel, only the forward.
- `Erase`: one random-erasing box on the normalised tensor, filled with zeros (timm's "const" mode) or with
  per-pixel noise (timm's "pixel" mode) from a counter-based generator keyed by the stored key (see `erase_noise`),
  so the noise is the same on every machine. Replay calls torchvision's `erase(x, top, left, h, w, fill)`.

Mixing lives in view.py (a mixed view names a partner view). Parameters are validated when read: a cache from
elsewhere is untrusted, so every number has a range and every name is one of a fixed set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..errors import AttncacheError

# timm's RandAugment ops (both the plain and the "increasing" sets) and a bound on their arguments' magnitude
# (timm's level functions stay far inside these; the bound only keeps a hostile cache's numbers sane).
OP_ARG_BOUNDS: dict[str, tuple[float, ...]] = {
    "AutoContrast": (), "Equalize": (), "Invert": (),
    "Rotate": (360.0,), "ShearX": (10.0,), "ShearY": (10.0,), "TranslateXRel": (1.0,), "TranslateYRel": (1.0,),
    "TranslateX": (1e4,), "TranslateY": (1e4,),
    "Posterize": (8,), "PosterizeIncreasing": (8,), "PosterizeOriginal": (8,),
    "Solarize": (256,), "SolarizeIncreasing": (256,), "SolarizeAdd": (255,),
    "Color": (10.0,), "ColorIncreasing": (10.0,), "Contrast": (10.0,), "ContrastIncreasing": (10.0,),
    "Brightness": (10.0,), "BrightnessIncreasing": (10.0,), "Sharpness": (10.0,), "SharpnessIncreasing": (10.0,),
}
INTEGER_ARG_OPS = {"Posterize", "PosterizeIncreasing", "PosterizeOriginal", "Solarize", "SolarizeIncreasing",
                   "SolarizeAdd"}
RESAMPLES = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC}
ERASE_FILLS = ("pixel", "const")


def finite_number(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise AttncacheError(f"{what} {v!r}: not a finite number")
    return v


def int_box(box, what: str) -> tuple[int, int, int, int]:
    if (not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                               for v in box)
            or box[0] < 0 or box[1] < 0 or box[2] < box[0] or box[3] < box[1]):
        raise AttncacheError(f"{what} {box!r}: expected integer [left, top, right, bottom]")
    return tuple(box)


def check_keys(d, allowed: set[str], what: str) -> None:
    if not isinstance(d, dict):
        raise AttncacheError(f"{what} {d!r}: not an object")
    unknown = set(d) - allowed
    if unknown:
        raise AttncacheError(f"{what}: parameters {sorted(unknown)} are not supported by this attncache version")


@dataclass(frozen=True)
class AugmentOp:
    name: str  # timm's op name
    magnitude: float  # the drawn level (0..10 scale), negative where the op's direction was mirrored
    args: tuple  # what timm's level function made of it: the op function's positional arguments
    fill: tuple[int, int, int]  # RGB fill of pixels a geometric op uncovers
    resample: str  # filter of geometric ops

    def apply(self, img: Image.Image) -> Image.Image:
        from timm.data.auto_augment import NAME_TO_OP

        if self.name.startswith("Posterize") and self.args[0] == 0:
            # timm asks for 0 bits at the top magnitude (PosterizeIncreasing at m=10); Pillow < 10.3 returned
            # black (every bit masked), newer Pillow refuses. Keep the old, documented result on every Pillow.
            return Image.new(img.mode, img.size, 0)
        return NAME_TO_OP[self.name](img, *self.args, fillcolor=self.fill, resample=RESAMPLES[self.resample])

    def to_json(self) -> dict:
        return {"op": self.name, "magnitude": float(self.magnitude), "args": list(self.args),
                "fill": list(self.fill), "resample": self.resample}

    @classmethod
    def from_json(cls, d) -> AugmentOp:
        check_keys(d, {"op", "magnitude", "args", "fill", "resample"}, "augment op")
        name = d.get("op")
        if name not in OP_ARG_BOUNDS:
            raise AttncacheError(f"augment op {name!r}: not one of timm's RandAugment ops")
        magnitude = finite_number(d.get("magnitude"), f"{name} magnitude")
        args, bounds = d.get("args"), OP_ARG_BOUNDS[name]
        if not isinstance(args, list) or len(args) != len(bounds):
            raise AttncacheError(f"{name} args {args!r}: expected {len(bounds)} number(s)")
        for value, bound in zip(args, bounds, strict=True):
            if abs(finite_number(value, f"{name} argument")) > bound or (
                    name in INTEGER_ARG_OPS and (not isinstance(value, int) or value < 0)):
                raise AttncacheError(f"{name} argument {value!r}: out of range")
        fill = d.get("fill")
        if not isinstance(fill, list) or len(fill) != 3 or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in fill):
            raise AttncacheError(f"{name} fill {fill!r}: expected 3 integers 0..255")
        if d.get("resample") not in RESAMPLES:
            raise AttncacheError(f"{name} resample {d.get('resample')!r}: expected one of {sorted(RESAMPLES)}")
        return cls(name, magnitude, tuple(args), tuple(fill), d["resample"])


@dataclass(frozen=True)
class Erase:
    box: tuple[int, int, int, int]  # left, top, right, bottom in the rendered size x size view
    fill: str  # "pixel": noise from `key`; "const": zeros (the normalised mean colour)
    key: str | None = None  # 128-bit Philox key, 32 hex digits ("pixel" only)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2.functional import erase

        left, top, right, bottom = self.box
        h, w = bottom - top, right - left
        if h == 0 or w == 0:
            return x
        value = erase_noise(self.key, (x.shape[0], h, w)) if self.fill == "pixel" else \
            torch.zeros((x.shape[0], 1, 1), dtype=x.dtype)
        return erase(x, top, left, h, w, value)

    def to_json(self) -> dict:
        return {"box": list(self.box), "fill": self.fill, **({"key": self.key} if self.key is not None else {})}

    @classmethod
    def from_json(cls, d) -> Erase:
        check_keys(d, {"box", "fill", "key"}, "erase")
        box = int_box(d.get("box"), "erase box")
        fill, key = d.get("fill"), d.get("key")
        if fill not in ERASE_FILLS:
            raise AttncacheError(f"erase fill {fill!r}: expected one of {ERASE_FILLS}")
        if (fill == "pixel") != (key is not None) or (key is not None and (
                not isinstance(key, str) or len(key) != 32 or key.strip("0123456789abcdef"))):
            raise AttncacheError(f"erase key {key!r}: 'pixel' fill needs a 32-hex-digit key, 'const' none")
        return cls(box, fill, key)


@dataclass(frozen=True)
class DropPathMask:
    rate: float  # drop probability per block (timm's drop_path_rate, the same for every block)
    keep: tuple[bool, ...]  # per block: False = both residual branches dropped for this view

    def to_json(self) -> dict:
        return {"rate": float(self.rate), "keep": [bool(k) for k in self.keep]}

    @classmethod
    def from_json(cls, d) -> DropPathMask:
        check_keys(d, {"rate", "keep"}, "drop_path")
        rate, keep = finite_number(d.get("rate"), "drop_path rate"), d.get("keep")
        if not 0 < rate < 1:
            raise AttncacheError(f"drop_path rate {rate!r}: expected 0 < rate < 1")
        if not isinstance(keep, list) or not 1 <= len(keep) <= 4096 or not all(isinstance(k, bool) for k in keep):
            raise AttncacheError(f"drop_path keep {keep!r}: expected a list of booleans, one per block")
        return cls(rate, tuple(keep))


def drop_path_keep(views) -> tuple[torch.Tensor | None, float]:
    """The (B, depth) keep masks of a batch of views and their rate; (None, 0.0) when they carry none."""
    masks = [v.drop_path for v in views]
    if all(m is None for m in masks):
        return None, 0.0
    if any(m is None for m in masks) or len({(m.rate, len(m.keep)) for m in masks}) != 1:
        raise AttncacheError("views of one batch carry different drop-path masks")
    return torch.tensor([m.keep for m in masks], dtype=torch.bool), masks[0].rate


def erase_noise(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Per-pixel erasing noise, identical on every machine: mean 0, variance 1 (timm draws `normal_()` here).

    Philox4x64-10 (Salmon et al. 2011; numpy's `Philox(key=...)`), keyed by the 128-bit `key` (two little-endian
    64-bit words), gives 64-bit words from the blocks at counters 1, 2, 3, ... (numpy increments before each
    block), 4 words per block. Each value takes 6 consecutive words, i.e. 12 uniform 32-bit halves u, and is
    sum(u) / 2**32 - 6 (the Irwin-Hall approximation of a standard normal), in row-major order of `shape`.
    Every step is exact integer or power-of-two arithmetic, so no libm or SIMD difference can change a bit; the
    last step rounds to float32.
    """
    count = math.prod(shape)
    words = np.random.Philox(key=np.frombuffer(bytes.fromhex(key), dtype="<u8")).random_raw(6 * count)
    words = words.reshape(count, 6)
    total = (words & 0xFFFFFFFF).sum(axis=1) + (words >> np.uint64(32)).sum(axis=1)
    values = total.astype(np.float64) / 2.0**32 - 6.0
    return torch.from_numpy(values.astype(np.float32)).reshape(shape)

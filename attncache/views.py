"""Views: the explicit parameters that turn an image into the exact pixels a teacher (and later a student) sees.

A cache stores views, not images. Each view is drawn once at extraction from `seed` and the sample key, stored in
the cache, and replayed with `render()` — the one function both extraction and training call. Parameters are
explicit numbers (a crop box in source pixels, a flip flag), never RNG seeds, so a replay in another lab or with
another library version gives the same pixels.

`render` uses Pillow's uint8 resampling (`Image.resize(box=...)`): integer fixed-point arithmetic, identical on
every platform, and what timm/torchvision use for PIL inputs.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .errors import AttncacheError

INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class View:
    """One view of one image: crop `box` = (left, top, right, bottom) in source pixels, then resize, then flip."""

    box: tuple[float, float, float, float]
    flip: bool = False

    def to_json(self) -> dict:
        return {"box": [float(v) for v in self.box], "flip": bool(self.flip)}

    @classmethod
    def from_json(cls, d: dict) -> View:
        unknown = set(d) - {"box", "flip"}
        if unknown:
            raise AttncacheError(f"view parameters {sorted(unknown)} are not supported by this attncache version")
        box = tuple(float(v) for v in d["box"])
        if len(box) != 4 or not all(math.isfinite(v) for v in box) or box[2] <= box[0] or box[3] <= box[1]:
            raise AttncacheError(f"invalid view box {d['box']!r}")
        return cls(box=box, flip=bool(d.get("flip", False)))


@dataclass(frozen=True)
class ViewPolicy:
    """How views were drawn: recorded in the manifest so a cache says how it was made."""

    split: str = "train"  # "train": random resized crops (+ flip); "val": one resize + center crop
    views_per_image: int = 1
    seed: int = 0
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    crop_pct: float = 0.875  # val only

    def __post_init__(self):
        if self.split not in ("train", "val"):
            raise AttncacheError(f"--split {self.split!r}: expected 'train' or 'val'")
        if self.views_per_image < 1:
            raise AttncacheError(f"--views {self.views_per_image}: must be >= 1")
        if self.split == "val" and self.views_per_image != 1:
            raise AttncacheError("--split val uses one deterministic view per image: drop --views")
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise AttncacheError(f"crop scale {self.scale}: expected 0 < min <= max <= 1")

    def to_json(self) -> dict:
        return {
            "split": self.split,
            "views_per_image": self.views_per_image,
            "seed": self.seed,
            "scale": list(self.scale),
            "ratio": list(self.ratio),
            "hflip": self.hflip,
            "crop_pct": self.crop_pct,
        }

    @classmethod
    def from_json(cls, d: dict) -> ViewPolicy:
        return cls(**{**d, "scale": tuple(d["scale"]), "ratio": tuple(d["ratio"])})

    def draw(self, key: str, width: int, height: int) -> list[View]:
        """The views of one image; a pure function of (policy, key, image size)."""
        if self.split == "val":
            return [center_crop_view(width, height, self.crop_pct)]
        rng = np.random.default_rng(_key_seed(self.seed, key))
        return [random_resized_crop_view(rng, width, height, self.scale, self.ratio, self.hflip)
                for _ in range(self.views_per_image)]


def _key_seed(seed: int, key: str) -> int:
    # Seeded per key, not per position: adding or reordering images leaves every other image's views unchanged.
    return int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:8], "little")


def center_crop_view(width: int, height: int, crop_pct: float) -> View:
    """timm/torchvision eval transform (resize shorter side to S/crop_pct, center crop S) as one crop box."""
    side = min(width, height) * crop_pct
    left, top = (width - side) / 2, (height - side) / 2
    return View(box=(left, top, left + side, top + side), flip=False)


def random_resized_crop_view(rng, width, height, scale, ratio, hflip) -> View:
    """torchvision's RandomResizedCrop sampling (10 tries, then a center crop), drawn from `rng`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    box = None
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            box = (left, top, left + w, top + h)
            break
    if box is None:  # fallback: whole image clipped to the ratio range
        in_ratio = width / height
        w, h = (width, int(round(width / ratio[0]))) if in_ratio < ratio[0] else (
            (int(round(height * ratio[1])), height) if in_ratio > ratio[1] else (width, height))
        left, top = (width - w) // 2, (height - h) // 2
        box = (left, top, left + w, top + h)
    flip = bool(rng.uniform() < hflip)
    return View(box=tuple(float(v) for v in box), flip=flip)


def render(image: Image.Image, view: View, size: int, interpolation: str, mean, std) -> torch.Tensor:
    """Pixels of `view` of `image`: a float32 tensor (3, size, size), normalised with the teacher's mean/std."""
    if interpolation not in INTERPOLATIONS:
        raise AttncacheError(f"interpolation {interpolation!r}: expected one of {sorted(INTERPOLATIONS)}")
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    out = rgb.resize((size, size), resample=INTERPOLATIONS[interpolation], box=view.box)
    if view.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - mean_t) / std_t

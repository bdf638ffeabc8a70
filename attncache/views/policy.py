"""How views are drawn: random resized crops and flips for training, timm's eval transform for validation.

Drawing happens once, at extraction, and the drawn parameters are stored; a view is a pure function of
(policy, image key, image size), so adding or reordering images leaves every other image's views unchanged.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from ..errors import AttncacheError
from .view import View


@dataclass(frozen=True)
class ViewPolicy:
    split: str = "train"  # "train": random resized crops (+ flip); "val": timm's resize + centre crop
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
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise AttncacheError(f"crop ratio {self.ratio}: expected 0 < min <= max")
        if not (0 <= self.hflip <= 1):
            raise AttncacheError(f"flip probability {self.hflip}: expected 0..1")
        if not (0 < self.crop_pct <= 1):
            raise AttncacheError(f"crop_pct {self.crop_pct}: expected 0 < crop_pct <= 1")

    def to_json(self) -> dict:
        return {"split": self.split, "views_per_image": self.views_per_image, "seed": self.seed,
                "scale": list(self.scale), "ratio": list(self.ratio), "hflip": self.hflip, "crop_pct": self.crop_pct}

    @classmethod
    def from_json(cls, d: dict) -> ViewPolicy:
        return cls(**{**d, "scale": tuple(d["scale"]), "ratio": tuple(d["ratio"])})

    def draw(self, key: str, width: int, height: int, size: int) -> list[View]:
        """The views of one image (`size`: the teacher's input size, which the val crop depends on)."""
        if self.split == "val":
            return [center_crop_view(width, height, size, self.crop_pct)]
        rng = np.random.default_rng(key_seed(self.seed, key))
        return [random_resized_crop_view(rng, width, height, self.scale, self.ratio, self.hflip)
                for _ in range(self.views_per_image)]


def key_seed(seed: int, key: str) -> int:
    """First 8 bytes (little-endian) of sha256("{seed}\\0{key}"): per key, not per position."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:8], "little")


def center_crop_view(width: int, height: int, size: int, crop_pct: float) -> View:
    """timm's eval transform as a view: resize the shorter side to floor(size / crop_pct) (torchvision's integer
    arithmetic for the longer side), then the centre `size` x `size` crop (torchvision's rounding of offsets)."""
    scale = math.floor(size / crop_pct)
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(scale * long / short)
    new_w, new_h = (scale, new_long) if width <= height else (new_long, scale)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return View(box=(float(left), float(top), float(left + size), float(top + size)), resize=(new_w, new_h))


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
        if in_ratio < ratio[0]:
            w, h = width, int(round(width / ratio[0]))
        elif in_ratio > ratio[1]:
            w, h = int(round(height * ratio[1])), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        box = (left, top, left + w, top + h)
    flip = bool(rng.uniform() < hflip)
    return View(box=tuple(float(v) for v in box), flip=flip)

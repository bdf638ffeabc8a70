"""A view: the explicit parameters that turn an image into the exact pixels a teacher (and later a student) sees.

A cache stores views, not images, and `render()` is the one function both extraction and training call to turn an
image and its view into pixels. Parameters are explicit numbers, never RNG seeds, so a replay in another lab or with
another library version gives the same pixels:

1. `resize` (optional): resize the whole image to (w, h), as timm's eval transform does before its centre crop;
2. crop `box` = (left, top, right, bottom) and resample it to S x S (an integer S x S box is a plain crop);
3. `flip`: mirror left-right.

Resampling is Pillow's uint8 `Image.resize` (integer fixed-point arithmetic, identical on every platform), what
timm and torchvision use for PIL inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..errors import AttncacheError

INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
MAX_SIDE = 1 << 16


@dataclass(frozen=True)
class View:
    box: tuple[float, float, float, float]
    flip: bool = False
    resize: tuple[int, int] | None = None

    def to_json(self) -> dict:
        out = {"box": [float(v) for v in self.box], "flip": bool(self.flip)}
        if self.resize is not None:
            out["resize"] = [int(v) for v in self.resize]
        return out

    @classmethod
    def from_json(cls, d: dict) -> View:
        if not isinstance(d, dict):
            raise AttncacheError(f"view {d!r}: not an object")
        unknown = set(d) - {"box", "flip", "resize"}
        if unknown:
            raise AttncacheError(f"view parameters {sorted(unknown)} are not supported by this attncache version")
        box, flip, resize = d.get("box"), d.get("flip", False), d.get("resize")
        if (not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box)
                or not all(math.isfinite(v) for v in box) or box[2] <= box[0] or box[3] <= box[1]):
            raise AttncacheError(f"invalid view box {box!r}")
        if not isinstance(flip, bool):
            raise AttncacheError(f"invalid view flip {flip!r}")
        if resize is not None and (not isinstance(resize, list) or len(resize) != 2
                                   or not all(_is_int(v) and 1 <= v <= MAX_SIDE for v in resize)):
            raise AttncacheError(f"invalid view resize {resize!r}")
        return cls(box=tuple(float(v) for v in box), flip=flip, resize=tuple(resize) if resize else None)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def render(image: Image.Image, view: View, size: int, interpolation: str, mean, std) -> torch.Tensor:
    """Pixels of `view` of `image`: a float32 tensor (3, size, size), normalised with the teacher's mean/std."""
    if interpolation not in INTERPOLATIONS:
        raise AttncacheError(f"interpolation {interpolation!r}: expected one of {sorted(INTERPOLATIONS)}")
    resample = INTERPOLATIONS[interpolation]
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    if view.resize is not None:
        rgb = rgb.resize(view.resize, resample=resample)
    left, top, right, bottom = view.box
    if left < 0 or top < 0 or right > rgb.width or bottom > rgb.height:
        raise AttncacheError(f"view box {list(view.box)} lies outside the {rgb.width}x{rgb.height} image")
    if (right - left, bottom - top) == (size, size) and all(float(v).is_integer() for v in view.box):
        out = rgb.crop(tuple(int(v) for v in view.box))
    else:
        out = rgb.resize((size, size), resample=resample, box=view.box)
    if view.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - mean_t) / std_t

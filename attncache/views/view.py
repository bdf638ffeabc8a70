"""A view: the explicit parameters that turn an image into the exact pixels a teacher (and later a student) sees.

A cache stores views, not images, and `render()` is the one function both extraction and training call to turn an
image and its view into pixels. Parameters are explicit numbers, never RNG seeds, so a replay in another lab or with
another library version gives the same pixels:

1. `resize` (optional): resize the whole image to (w, h), as timm's eval transform does before its centre crop;
2. crop `box` = (left, top, right, bottom) and resample it to S x S (an integer S x S box is a plain crop);
3. `flip`: mirror left-right;
4. `augment`: RandAugment ops in order, on the S x S PIL image (augment.py);
5. to float, normalise with the teacher's mean/std;
6. `erase`: random-erasing boxes on the normalised tensor (augment.py);
7. `mix`: blend with a partner view (mixup), or paste the partner's pixels into a box (cutmix), as timm's `Mixup`
   does; the partner view is rendered by steps 1-6 from the partner's own image.

This is the order of timm's training transform (`create_transform`, then `Mixup` on the batch). Resampling is
Pillow's uint8 `Image.resize` (integer fixed-point arithmetic, identical on every platform), what timm and
torchvision use for PIL inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..errors import AttncacheError
from .augment import AugmentOp, DropPathMask, Erase, check_keys, finite_number, int_box

INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
MAX_SIDE = 1 << 16
MAX_OPS = 16  # augment ops or erase boxes per view (timm's recipes use 2 and 1)


@dataclass(frozen=True)
class Mix:
    """Mixing with a partner: `lam` is this view's weight, of the pixels (mixup) and of the labels (both); with a
    cutmix `box` (left, top, right, bottom), the box's pixels come from the partner and lam = 1 - box area / S^2."""

    partner: str  # the partner image's key
    view: View  # the partner's own view (never itself mixed)
    lam: float
    box: tuple[int, int, int, int] | None = None
    # The partner's sample index in its cache (how format version 5 stores the partner; -1: not known). Not part
    # of a view's identity: the key is.
    partner_index: int = field(default=-1, compare=False)

    def to_json(self) -> dict:
        return {"partner": self.partner, "view": self.view.to_json(), "lam": float(self.lam),
                **({"box": list(self.box)} if self.box is not None else {})}

    @classmethod
    def from_json(cls, d) -> Mix:
        check_keys(d, {"partner", "view", "lam", "box"}, "mix")
        partner, lam = d.get("partner"), finite_number(d.get("lam"), "mix lam")
        if not isinstance(partner, str) or not partner:
            raise AttncacheError(f"mix partner {partner!r}: expected an image key")
        if not 0 <= lam <= 1:
            raise AttncacheError(f"mix lam {lam!r}: expected 0..1")
        view = View.from_json(d.get("view"))
        if view.mix is not None or view.drop_path is not None:
            raise AttncacheError("mix: a partner view cannot itself be mixed or carry drop-path masks")
        box = int_box(d["box"], "cutmix box") if "box" in d else None
        return cls(partner, view, lam, box)


@dataclass(frozen=True)
class View:
    box: tuple[float, float, float, float]
    flip: bool = False
    resize: tuple[int, int] | None = None
    augment: tuple[AugmentOp, ...] = ()
    erase: tuple[Erase, ...] = ()
    mix: Mix | None = None
    drop_path: DropPathMask | None = None  # the teacher's stochastic-depth masks (no effect on pixels)

    @property
    def needs_version(self) -> int:
        """The oldest cache format version that can hold this view."""
        if self.augment or self.erase or self.mix is not None or self.drop_path is not None:
            return 3
        return 2 if self.resize is not None else 1

    def to_json(self) -> dict:
        out = {"box": [float(v) for v in self.box], "flip": bool(self.flip)}
        if self.resize is not None:
            out["resize"] = [int(v) for v in self.resize]
        if self.augment:
            out["augment"] = [op.to_json() for op in self.augment]
        if self.erase:
            out["erase"] = [e.to_json() for e in self.erase]
        if self.mix is not None:
            out["mix"] = self.mix.to_json()
        if self.drop_path is not None:
            out["drop_path"] = self.drop_path.to_json()
        return out

    @classmethod
    def from_json(cls, d: dict) -> View:
        if not isinstance(d, dict):
            raise AttncacheError(f"view {d!r}: not an object")
        unknown = set(d) - {"box", "flip", "resize", "augment", "erase", "mix", "drop_path"}
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
        augment, erase = d.get("augment", []), d.get("erase", [])
        if not isinstance(augment, list) or len(augment) > MAX_OPS or not isinstance(erase, list) or \
                len(erase) > MAX_OPS:
            raise AttncacheError(f"view augment/erase: expected lists of at most {MAX_OPS} ops")
        return cls(box=tuple(float(v) for v in box), flip=flip, resize=tuple(resize) if resize else None,
                   augment=tuple(AugmentOp.from_json(op) for op in augment),
                   erase=tuple(Erase.from_json(e) for e in erase),
                   mix=Mix.from_json(d["mix"]) if "mix" in d else None,
                   drop_path=DropPathMask.from_json(d["drop_path"]) if "drop_path" in d else None)

    def check_bounds(self, width: int, height: int, size: int) -> None:
        """Every box inside what it cuts: the crop inside the (resized) image, erase and cutmix boxes inside the
        size x size view. `width`/`height`: the image's (the partner's bounds are checked by the caller)."""
        if self.resize is not None:
            width, height = self.resize
        left, top, right, bottom = self.box
        if left < 0 or top < 0 or right > width or bottom > height:
            raise AttncacheError(f"box {list(self.box)} outside the {width}x{height} image")
        boxes = [e.box for e in self.erase] + ([self.mix.box] if self.mix is not None and self.mix.box else [])
        for b in boxes:
            if b[2] > size or b[3] > size:
                raise AttncacheError(f"erase/cutmix box {list(b)} outside the {size}x{size} view")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def render(image: Image.Image, view: View, size: int, interpolation: str, mean, std,
           partner: Image.Image | None = None) -> torch.Tensor:
    """Pixels of `view` of `image`: a float32 tensor (3, size, size), normalised with the teacher's mean/std.
    A mixed view needs its partner's image."""
    x = _render_one(image, view, size, interpolation, mean, std)
    if view.mix is None:
        return x
    if partner is None:
        raise AttncacheError(f"a mixed view needs the image of its partner {view.mix.partner!r}")
    return mix_pixels(x, _render_one(partner, view.mix.view, size, interpolation, mean, std), view.mix)


def mix_pixels(x: torch.Tensor, other: torch.Tensor, mix: Mix) -> torch.Tensor:
    """timm `Mixup`'s arithmetic for one pair: cutmix pastes the box, mixup is x * lam + other * (1 - lam)."""
    if mix.box is not None:
        left, top, right, bottom = mix.box
        x = x.clone()
        x[:, top:bottom, left:right] = other[:, top:bottom, left:right]
        return x
    return x.mul(mix.lam).add_(other.mul(1.0 - mix.lam))


def _render_one(image: Image.Image, view: View, size: int, interpolation: str, mean, std) -> torch.Tensor:
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
    for op in view.augment:
        out = op.apply(out)
    x = torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    x = (x - mean_t) / std_t
    for e in view.erase:
        if e.box[2] > size or e.box[3] > size:
            raise AttncacheError(f"erase box {list(e.box)} outside the {size}x{size} view")
        x = e.apply(x)
    return x

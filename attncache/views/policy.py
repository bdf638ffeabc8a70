"""How views are drawn: random resized crops and flips for training (optionally RandAugment, random erasing and
mixup/cutmix, as timm's training transform and `Mixup` draw them), timm's eval transform for validation.

Drawing happens once, at extraction, and the drawn parameters are stored. A view is a pure function of (policy,
image key, image size), and a mixed view also of the partner's (key, size): the partner is drawn from the sample
list by the view's own random stream, never from a batch, so views do not depend on batch size, workers or world
size. Each kind of draw has its own stream (crop, augment, mix), so turning augmentation on leaves the crops as
they were.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, replace
from functools import lru_cache

import numpy as np

from ..errors import AttncacheError
from .augment import RESAMPLES, AugmentOp, DropPathMask, Erase
from .view import Mix, View

IMAGENET_MEAN = (0.485, 0.456, 0.406)
# timm RandomErasing's defaults (what the reference recipe runs): area 2 %..1/3 of the view, aspect 0.3..1/0.3
ERASE_AREA = (0.02, 1 / 3)
ERASE_ASPECT = (0.3, 1 / 0.3)


@dataclass(frozen=True)
class Augmentation:
    """What is drawn on top of crop + flip; all off by default. Names and meanings follow timm's training options
    (`--aa`, `--reprob/--remode/--recount`, `--mixup/--cutmix/--mixup-prob/--mixup-switch-prob`)."""

    randaugment: str | None = None  # timm config string, e.g. "rand-m9-mstd0.5-inc1"
    erase_prob: float = 0.0
    erase_mode: str = "pixel"  # "pixel" (per-pixel noise) | "const" (zeros)
    erase_count: int = 1
    mixup: float = 0.0  # Beta(a, a) of mixup's lambda; 0: no mixup
    cutmix: float = 0.0  # Beta(a, a) of cutmix's lambda; 0: no cutmix
    mix_prob: float = 1.0  # probability that a view is mixed at all
    mix_switch: float = 0.5  # with both on: probability of cutmix rather than mixup
    # Stochastic depth of the teacher: a keep mask per view and block, stored and reused by the student's
    # transferred blocks (the reference distill recipe shares drop-path masks between student and teacher).
    teacher_drop_path: float = 0.0

    def __post_init__(self):
        if self.randaugment is not None:
            parse_randaugment(self.randaugment)  # now: a bad string is an option error
        if not 0 <= self.erase_prob <= 1:
            raise AttncacheError(f"`erase_prob` {self.erase_prob}: expected 0..1")
        if self.erase_mode not in ("pixel", "const"):
            raise AttncacheError(f"`erase_mode` {self.erase_mode!r}: expected 'pixel' or 'const'")
        if not 1 <= self.erase_count <= 16:
            raise AttncacheError(f"`erase_count` {self.erase_count}: expected 1..16")
        for name in ("mixup", "cutmix"):
            if not 0 <= getattr(self, name) <= 100:
                raise AttncacheError(f"`{name}` {getattr(self, name)}: expected an alpha in 0..100 (0: off)")
        for name in ("mix_prob", "mix_switch"):
            if not 0 <= getattr(self, name) <= 1:
                raise AttncacheError(f"`{name}` {getattr(self, name)}: expected 0..1")
        if not 0 <= self.teacher_drop_path < 1:
            raise AttncacheError(f"`teacher_drop_path` {self.teacher_drop_path}: expected 0 <= p < 1")

    @property
    def enabled(self) -> bool:
        return self != Augmentation()

    @property
    def mixes(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mix_prob > 0

    def to_json(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=8)
def parse_randaugment(text: str):
    """timm's own parse of a RandAugment string: (ops, ops per image, choice weights or None)."""
    from timm.data.auto_augment import rand_augment_transform

    if not isinstance(text, str) or not text.startswith("rand"):
        raise AttncacheError(f"`randaugment` {text!r}: expected a timm RandAugment string like "
                             "'rand-m9-mstd0.5-inc1'")
    try:
        ra = rand_augment_transform(text, {})
    except (AssertionError, ValueError, KeyError) as exc:
        raise AttncacheError(f"`randaugment` {text!r}: not a RandAugment string timm accepts ({exc})") from exc
    return ra.ops, ra.num_layers, ra.choice_weights


@dataclass(frozen=True)
class ViewPolicy:
    split: str = "train"  # "train": random resized crops (+ flip); "val": timm's resize + centre crop
    views_per_image: int = 1
    seed: int = 0
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    crop_pct: float = 0.875  # val only
    augment: Augmentation = Augmentation()  # train only

    def __post_init__(self):
        if self.split not in ("train", "val"):
            raise AttncacheError(f"`split` {self.split!r}: expected 'train' or 'val'")
        if self.views_per_image < 1:
            raise AttncacheError(f"`views` {self.views_per_image}: must be >= 1")
        if self.split == "val" and self.views_per_image != 1:
            raise AttncacheError("`split` val uses one deterministic view per image: drop `views`")
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise AttncacheError(f"crop scale {self.scale}: expected 0 < min <= max <= 1")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise AttncacheError(f"crop ratio {self.ratio}: expected 0 < min <= max")
        if not (0 <= self.hflip <= 1):
            raise AttncacheError(f"flip probability {self.hflip}: expected 0..1")
        if not (0 < self.crop_pct <= 1):
            raise AttncacheError(f"crop_pct {self.crop_pct}: expected 0 < crop_pct <= 1")
        if self.split == "val" and self.augment.enabled:
            raise AttncacheError("`split` val draws timm's deterministic eval view: augmentation and mixing are "
                                 "for training views")

    def to_json(self) -> dict:
        out = {"split": self.split, "views_per_image": self.views_per_image, "seed": self.seed,
               "scale": list(self.scale), "ratio": list(self.ratio), "hflip": self.hflip, "crop_pct": self.crop_pct}
        if self.augment.enabled:  # absent when off: plain caches keep the manifests older versions wrote
            out["augment"] = self.augment.to_json()
        return out

    @classmethod
    def from_json(cls, d: dict) -> ViewPolicy:
        return cls(**{**d, "scale": tuple(d["scale"]), "ratio": tuple(d["ratio"]),
                      "augment": Augmentation(**d.get("augment", {}))})

    def draw(self, key: str, width: int, height: int, size: int, *, mean=IMAGENET_MEAN,
             interpolation: str = "bicubic", only: int | None = None) -> list[View]:
        """The unmixed views of one image (with `only`: just view `only`, which costs its own augmentation draw
        alone). `size`, `mean`, `interpolation`: the teacher's input size (the val crop and the augmentation
        depend on it), normalisation mean (RandAugment's fill colour) and filter."""
        if self.split == "val":
            return [center_crop_view(width, height, size, self.crop_pct)]
        rng = np.random.default_rng(key_seed(self.seed, key))
        # the crops come from one stream in view order: view k needs the draws of views 0..k-1 (cheap)
        views = [random_resized_crop_view(rng, width, height, self.scale, self.ratio, self.hflip)
                 for _ in range(self.views_per_image if only is None else only + 1)]
        indices = range(len(views)) if only is None else [only]
        a = self.augment
        if a.randaugment is None and a.erase_prob == 0:
            return [views[i] for i in indices]
        out = []
        for index in indices:
            rng = np.random.default_rng(key_seed(self.seed, key, "augment", index))
            ops = draw_randaugment(rng, a, size, mean, interpolation) if a.randaugment else ()
            out.append(replace(views[index], augment=ops, erase=draw_erase(rng, a, size)))
        return out

    def view(self, samples: list[dict], index: int, view_index: int, size: int, *, mean=IMAGENET_MEAN,
             interpolation: str = "bicubic", depth: int | None = None) -> View:
        """View `view_index` of `samples[index]`, mixed with a partner when the policy mixes; with the teacher's
        `depth`, it also carries the teacher's drop-path masks when the policy draws them."""
        s = samples[index]
        canvas = dict(mean=mean, interpolation=interpolation)
        view = self.draw(s["key"], s["width"], s["height"], size, **canvas, only=view_index)[0]
        rate = self.augment.teacher_drop_path
        if rate > 0 and depth is not None:
            rng = np.random.default_rng(key_seed(self.seed, s["key"], "drop_path", view_index))
            view = replace(view, drop_path=DropPathMask(rate, tuple(bool(k) for k in rng.random(depth) < 1 - rate)))
        if not self.augment.mixes or len(samples) < 2:
            return view
        rng = np.random.default_rng(key_seed(self.seed, s["key"], "mix", view_index))
        mix = draw_mix(rng, self.augment, size)
        if mix is None:
            return view
        lam, box = mix
        other = int(rng.integers(len(samples) - 1))
        other += other >= index
        partner = samples[other]
        partner_view = self.draw(partner["key"], partner["width"], partner["height"], size, **canvas,
                                 only=view_index)[0]
        return replace(view, mix=Mix(partner["key"], partner_view, lam, box, partner_index=other))

    def views(self, samples: list[dict], size: int, **canvas) -> list[View]:
        """Every record's view, in row order (view-major, as the cache stores them)."""
        return [self.view(samples, i, v, size, **canvas)
                for v in range(self.views_per_image) for i in range(len(samples))]


def key_seed(seed: int, key: str, *salt) -> int:
    """First 8 bytes (little-endian) of sha256("{seed}\\0{key}" + "\\0{s}" per salt): per key, not per position."""
    text = f"{seed}\0{key}" + "".join(f"\0{s}" for s in salt)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def draw_randaugment(rng, a: Augmentation, size: int, mean, interpolation: str) -> tuple[AugmentOp, ...]:
    """timm `RandAugment.__call__` and `AugmentOp.__call__`, drawn from `rng` and recorded: choose the ops, then
    per op: apply or not, the magnitude (gauss(m, mstd), clipped), the sign, timm's level function's arguments.
    The fill and filter are what timm's `create_transform` gives RandAugment for this teacher."""
    from timm.data import auto_augment

    ops, num_layers, weights = parse_randaugment(a.randaugment)
    hparams = {"translate_const": int(size * 0.45), "img_mean": tuple(min(255, round(255 * x)) for x in mean)}
    fill = tuple(int(v) for v in hparams["img_mean"])
    resample = interpolation if interpolation in RESAMPLES else "bicubic"  # PIL's affine ops take these three
    chosen = rng.choice(len(ops), num_layers, replace=weights is None, p=weights)
    out = []
    for op in (ops[i] for i in chosen):
        if op.prob < 1.0 and rng.random() > op.prob:
            continue
        magnitude = float(op.magnitude)
        mstd = op.magnitude_std
        if mstd == float("inf"):
            magnitude = float(rng.uniform(0, magnitude))
        elif mstd > 0:
            magnitude = float(rng.normal(magnitude, mstd))
        magnitude = max(0.0, min(magnitude, op.magnitude_max or auto_augment._LEVEL_DENOM))
        negate = bool(rng.random() > 0.5)
        args = level_args(op, magnitude, hparams, negate)
        if negate and args != level_args(op, magnitude, hparams, False):  # the sign mattered: record it
            magnitude = -magnitude
        out.append(AugmentOp(op.name, magnitude, args, fill, resample))
    return tuple(out)


def level_args(op, magnitude: float, hparams: dict, negate: bool) -> tuple:
    """timm's level function of `op` at `magnitude`, with the sign it would draw from Python's global `random`
    fixed to `negate` instead (so the sign comes from our stream and is recorded)."""
    from unittest import mock

    from timm.data import auto_augment

    if op.level_fn is None:
        return ()
    with mock.patch.object(auto_augment, "_randomly_negate", (lambda v: -v) if negate else (lambda v: v)):
        return tuple(op.level_fn(magnitude, {**op.hparams, **hparams}))


def draw_erase(rng, a: Augmentation, size: int) -> tuple[Erase, ...]:
    """timm `RandomErasing._erase` on a size x size view, drawn from `rng` and recorded."""
    if a.erase_prob == 0 or rng.random() > a.erase_prob:
        return ()
    out = []
    log_aspect = (math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1]))
    for _ in range(a.erase_count):
        for _attempt in range(10):
            target_area = rng.uniform(*ERASE_AREA) * size * size / a.erase_count
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < size and h < size:
                top = int(rng.integers(0, size - h + 1))
                left = int(rng.integers(0, size - w + 1))
                key = rng.bytes(16).hex() if a.erase_mode == "pixel" else None
                out.append(Erase((left, top, left + w, top + h), a.erase_mode, key))
                break
    return tuple(out)


def draw_mix(rng, a: Augmentation, size: int) -> tuple[float, tuple[int, int, int, int] | None] | None:
    """timm `Mixup._params_per_batch` for one view: None (not mixed), else (lam, cutmix box or None); the cutmix
    box and the corrected lam are timm's `cutmix_bbox_and_lam` (`rand_bbox`, correct_lam=True)."""
    if rng.random() >= a.mix_prob:
        return None
    use_cutmix = a.cutmix > 0 and (a.mixup == 0 or rng.random() < a.mix_switch)
    alpha = a.cutmix if use_cutmix else a.mixup
    lam = float(rng.beta(alpha, alpha))
    if not use_cutmix:
        return lam, None
    cut = int(size * math.sqrt(1 - lam))
    cy, cx = int(rng.integers(0, size)), int(rng.integers(0, size))
    top, bottom = min(max(cy - cut // 2, 0), size), min(max(cy + (cut + 1) // 2, 0), size)
    left, right = min(max(cx - cut // 2, 0), size), min(max(cx + (cut + 1) // 2, 0), size)
    return 1.0 - (bottom - top) * (right - left) / float(size * size), (left, top, right, bottom)


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

"""The embedded demo set: coloured shapes drawn procedurally (nothing to download, identical on every machine)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from .base import Entry, Source

DEMO_CLASSES = ["circle", "cross", "square", "triangle"]


class DemoSource(Source):
    """`per_class` images of each of 4 shape classes, 48x48 PNG; `split` changes the drawing seed."""

    def __init__(self, split: str = "train", per_class: int = 16, limit: int | None = None):
        self.split, self.per_class = split, per_class
        self.description = f"demo:{split}:{per_class}"
        self.classes = list(DEMO_CLASSES)
        self._listing = [(f"{c}/{i:04d}.png", ci) for ci, c in enumerate(DEMO_CLASSES)
                         for i in range(per_class)][:limit]

    def entries(self) -> list[Entry]:
        return [Entry(key, label, f"{self.description}:{key}") for key, label in self._listing]

    def read_index(self, index: int) -> bytes:
        rng = np.random.default_rng([0 if self.split == "train" else 1, index])
        return draw_shape(DEMO_CLASSES[self._listing[index][1]], rng)


def draw_shape(shape: str, rng, size: int = 48) -> bytes:
    bg = tuple(int(v) for v in rng.integers(0, 96, 3))
    fg = tuple(int(v) for v in rng.integers(128, 256, 3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    r = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    else:  # cross
        w = max(2, r // 3)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fg)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fg)
    noise = rng.integers(-12, 13, (size, size, 3))
    pixels = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()

"""Views: drawing is a pure function of (policy, key, size); render reproduces the documented pixel pipeline."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import image_bytes
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from attncache import open_cache
from attncache.errors import AttncacheError
from attncache.views import View, ViewPolicy, center_crop_view, render

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _img(size=(57, 33), mode="RGB", seed=0) -> Image.Image:
    return Image.open(io.BytesIO(image_bytes(size, mode, "PNG", seed)))


def _normalise(pil: Image.Image) -> torch.Tensor:
    """The documented steps 3-4 written out with numpy: uint8 HWC -> /255 -> (x - mean) / std, CHW."""
    a = np.asarray(pil, dtype=np.float32) / np.float32(255.0)
    a = (a - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def test_render_is_deterministic_and_follows_the_spec():
    img = _img()
    view = View(box=(3.0, 2.5, 40.0, 30.0), flip=False)
    a = render(img, view, 32, "bicubic", MEAN, STD)
    b = render(_img(), view, 32, "bicubic", MEAN, STD)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    expected = _normalise(img.resize((32, 32), resample=Image.Resampling.BICUBIC, box=view.box))
    torch.testing.assert_close(a, expected, rtol=0, atol=1e-6)


def test_render_converts_grayscale_to_rgb():
    gray = _img((45, 50), "L", seed=3)
    out = render(gray, View(box=(0, 0, 45, 50)), 16, "bilinear", (0.5,) * 3, (0.5,) * 3)
    assert out.shape == (3, 16, 16)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])  # three identical channels
    expected = _normalise(gray.convert("RGB").resize((16, 16), Image.Resampling.BILINEAR, box=(0, 0, 45, 50)))
    expected = expected * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)  # undo spec norm
    torch.testing.assert_close(out, (expected - 0.5) / 0.5, rtol=0, atol=1e-5)


def test_flip_really_flips_pixels():
    img = _img((64, 40), seed=5)
    box = (4.0, 6.0, 52.0, 38.0)
    plain = render(img, View(box=box, flip=False), 24, "bicubic", MEAN, STD)
    flipped = render(img, View(box=box, flip=True), 24, "bicubic", MEAN, STD)
    assert not torch.equal(plain, flipped)
    # pixel columns mirrored ...
    assert torch.equal(flipped, torch.flip(plain, dims=[2]))
    # ... and identical to Pillow's own left-right transpose of the resized crop
    pil = img.resize((24, 24), Image.Resampling.BICUBIC, box=box).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    torch.testing.assert_close(flipped, _normalise(pil), rtol=0, atol=1e-6)


def test_val_split_is_one_view_independent_of_the_key():
    policy = ViewPolicy(split="val", crop_pct=0.875)
    views = policy.draw("k", 80, 60, 32)
    assert views == policy.draw("other key", 80, 60, 32)  # does not depend on the key
    (v,) = views
    # timm: shorter side to floor(32 / 0.875) = 36, longer side int(36 * 80 / 60) = 48, centre 32 x 32 crop
    assert v == View(box=(8.0, 2.0, 40.0, 34.0), flip=False, resize=(48, 36)) == center_crop_view(80, 60, 32, 0.875)
    with pytest.raises(AttncacheError, match="`views`"):
        ViewPolicy(split="val", views_per_image=2)


@pytest.mark.parametrize("crop_pct", [0.875, 0.9, 0.95, 1.0])
@pytest.mark.parametrize("size", [(57, 33), (33, 57), (300, 161), (64, 64), (161, 300), (37, 36)])
@pytest.mark.parametrize("target", [32, 56])
def test_val_view_is_timms_eval_transform_pixel_for_pixel(crop_pct, size, target):
    """The val view renders exactly what timm's own eval transform (torchvision Resize of the shorter side to
    floor(S / crop_pct), CenterCrop S) gives on non-square images: equal tensors, not merely close ones."""
    from timm.data import create_transform

    img = _img(size, seed=sum(size))
    tf = create_transform(target, is_training=False, crop_pct=crop_pct, interpolation="bicubic", mean=MEAN, std=STD)
    view = ViewPolicy(split="val", crop_pct=crop_pct).draw("x", *size, target)[0]
    assert torch.equal(render(img, view, target, "bicubic", MEAN, STD), tf(img))


def test_train_views_are_a_function_of_seed_and_key_only():
    policy = ViewPolicy(views_per_image=3, seed=11)
    sizes = {"a/1.png": (40, 30), "b/2.png": (64, 64), "c/3.jpg": (31, 77)}
    forward = {k: policy.draw(k, *wh, 32) for k, wh in sizes.items()}
    backward = {k: policy.draw(k, *wh, 32) for k, wh in reversed(sizes.items())}
    assert forward == backward
    assert all(len(v) == 3 for v in forward.values())
    assert len({v for vs in forward.values() for v in vs}) == 9  # views differ between images and draws
    assert ViewPolicy(views_per_image=3, seed=12).draw("a/1.png", 40, 30, 32) != forward["a/1.png"]


def test_train_view_follows_documented_seeding():
    """docs/format.md: RandomResizedCrop sampling from numpy default_rng(first 8 bytes LE of sha256("{seed}\\0{key}")),
    then a flip with probability hflip. With a small scale range the first try always fits the image."""
    import hashlib
    import math

    policy = ViewPolicy(views_per_image=1, seed=11, scale=(0.1, 0.3))
    for key in ("a/1.png", "b/2.png", "z"):
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(f"11\0{key}".encode()).digest()[:8], "little"))
        area = 64 * 48 * rng.uniform(0.1, 0.3)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        top, left = int(rng.integers(0, 48 - h + 1)), int(rng.integers(0, 64 - w + 1))
        flip = rng.uniform() < 0.5
        assert policy.draw(key, 64, 48, 32) == [View(box=(left, top, left + w, top + h), flip=flip)]


def test_views_survive_dataset_reordering(tmp_path, tiny_teacher):
    """Two extractions over folders listing the same images in a different order (and with an extra class in
    front, which shifts every index and label) store the same views for every common key."""

    from conftest import make_image_folder

    from attncache.extract import extract

    imgs = [("b", "x.png", (40, 30), "RGB", "PNG"), ("c", "y.png", (33, 50), "RGB", "PNG")]
    one = make_image_folder(tmp_path / "one", imgs)
    two = make_image_folder(tmp_path / "two", [("a", "z.png", (36, 36), "RGB", "PNG")] + imgs)
    views = {}
    for name, folder in (("one", one), ("two", two)):
        out = tmp_path / f"cache_{name}"
        extract(tiny_teacher.config(folder, out, views=2, seed=5, layers="0"))
        cache = open_cache(str(out))
        rows = [cache.view_json(r) for r in range(len(cache))]
        views[name] = {(r["image"]["key"], r["view"]): (r["box"], r["flip"]) for r in rows}
    assert len(views["one"]) == 4 and len(views["two"]) == 6
    for key, view in views["one"].items():
        assert views["two"][key] == view


@settings(max_examples=150, deadline=None)
@given(
    width=st.integers(1, 400),
    height=st.integers(1, 400),
    lo=st.floats(0.001, 1.0),
    span=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32),
    key=st.text(min_size=1, max_size=12),
)
def test_drawn_views_lie_inside_the_image(width, height, lo, span, seed, key):
    policy = ViewPolicy(views_per_image=2, seed=seed, scale=(lo, min(1.0, lo + span)))
    for v in policy.draw(key, width, height, 32):
        left, top, right, bottom = v.box
        assert 0 <= left < right <= width
        assert 0 <= top < bottom <= height
        assert all(float(x).is_integer() for x in v.box)  # whole source pixels, as torchvision crops
        assert View.from_json(v.to_json()) == v  # survives the JSON round trip


@pytest.mark.parametrize("bad", [{"box": [0, 0, 0, 5]}, {"box": [0, 0, 5]}, {"box": [0, 0, float("nan"), 4]},
                                 {"box": [0, 0, 4, 4], "rotate": 90}])
def test_view_from_json_rejects(bad):
    with pytest.raises(AttncacheError, match="view"):
        View.from_json(bad)

"""Recipe parity: RandAugment, random erasing and mixup/cutmix views stored as explicit ops and replayed exactly.

References are independent of attncache's replay: timm's own `AugmentOp.__call__` (its RNG pinned), timm's `Mixup`
and `mixup_target` (their parameters pinned), timm's `rand_bbox`, torchvision's `ToTensor`/`Normalize`, a
pure-Python Philox4x64-10, and timm's explicit attention path for the maps.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import as_version_4, image_bytes, reference_maps
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from attncache.cache import open_cache
from attncache.errors import AttncacheError, CacheFormatError
from attncache.extract import extract
from attncache.recipes import RECIPES, extract_config, train_config
from attncache.sources import open_image
from attncache.store.format import seal
from attncache.store.records import TABLES
from attncache.train import train
from attncache.views import Augmentation, AugmentOp, Erase, Mix, View, ViewPolicy, erase_noise, render
from attncache.views.policy import draw_mix, level_args

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RECIPE_AUG = RECIPES["at-copy"].augment
DISTILL_AUG = RECIPES["at-distill"].augment  # the same views, plus the teacher's drop-path masks (rate 0.2)


def _img(w=48, h=40, seed=0) -> Image.Image:
    return open_image(image_bytes((w, h), seed=seed), "test")


# ---------------------------------------------------------------------------------------------------------------
# RandAugment: every op, several magnitudes, both signs, against timm's own AugmentOp


def _timm_ops():
    from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS, _RAND_TRANSFORMS

    return sorted(set(_RAND_TRANSFORMS) | set(_RAND_INCREASING_TRANSFORMS))


@pytest.mark.parametrize("name", _timm_ops())
def test_every_randaugment_op_replays_timms_own_op(name):
    """AugmentOp(name, stored args) on the view == timm's AugmentOp.__call__ at that magnitude and sign."""
    from timm.data.auto_augment import AugmentOp as TimmOp

    size = 32
    hparams = {"translate_const": int(size * 0.45), "img_mean": (124, 116, 104), "interpolation": Image.BICUBIC}
    img = _img(size, size)
    changed = 0
    for magnitude in (0.0, 3.0, 7.5, 9.0, 10.0):
        for negate in (False, True):
            timm_op = TimmOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)
            # pin timm's sign draw: _randomly_negate negates when random.random() > 0.5
            with mock.patch.object(random, "random", return_value=1.0 if negate else 0.0):
                try:
                    expected = timm_op(img.copy())
                except ValueError:  # Posterize to 0 bits: Pillow >= 10.3 refuses, older Pillow gave black
                    assert name.startswith("Posterize")
                    expected = Image.new("RGB", img.size, 0)
            args = level_args(timm_op, magnitude, hparams, negate)
            ours = AugmentOp(name, -magnitude if negate else magnitude, args, (124, 116, 104), "bicubic")
            stored = AugmentOp.from_json(json.loads(json.dumps(ours.to_json())))
            got = stored.apply(img.copy())
            assert np.array_equal(np.asarray(got), np.asarray(expected)), (name, magnitude, negate)
            changed += not np.array_equal(np.asarray(got), np.asarray(img))
    if name not in ("Posterize", "PosterizeOriginal"):  # (these keep all bits at some levels)
        assert changed > 0  # the op did something to the pixels at some magnitude


def test_randaugment_draw_follows_timms_policy():
    """The recipe's string parsed by timm: 2 ops per view from the 'increasing' set, each applied with p 0.5,
    magnitude ~ N(9, 0.5) clipped to [0, 10]; fill = the teacher mean as timm's create_transform rounds it."""
    policy = ViewPolicy(views_per_image=4, augment=Augmentation(randaugment="rand-m9-mstd0.5-inc1"))
    from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS

    counts, mags = [], []
    for i in range(300):
        for v in policy.draw(f"k{i}", 64, 48, 32, mean=MEAN):
            counts.append(len(v.augment))
            for op in v.augment:
                assert op.name in _RAND_INCREASING_TRANSFORMS
                assert op.fill == tuple(round(255 * m) for m in MEAN) and op.resample == "bicubic"
                mags.append(abs(op.magnitude))
    assert set(counts) == {0, 1, 2}
    assert abs(np.mean(counts) - 1.0) < 0.06  # 2 ops x p 0.5
    assert abs(np.mean(mags) - 9.0) < 0.1 and max(mags) <= 10.0


# ---------------------------------------------------------------------------------------------------------------
# erasing noise: a documented counter-based generator, bit for bit


MASK64 = (1 << 64) - 1


def _philox4x64_block(counter, key):
    m0, m1, w0, w1 = 0xD2E7470EE14C6C93, 0xCA5A826395121157, 0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B
    c, k = list(counter), list(key)
    for _ in range(10):
        p0, p1 = m0 * c[0], m1 * c[2]
        c = [(p1 >> 64) ^ c[1] ^ k[0], p1 & MASK64, (p0 >> 64) ^ c[3] ^ k[1], p0 & MASK64]
        k = [(k[0] + w0) & MASK64, (k[1] + w1) & MASK64]
    return c


def test_erase_noise_is_the_documented_philox_irwin_hall():
    key = hashlib.sha256(b"k").digest()[:16].hex()
    k0, k1 = int.from_bytes(bytes.fromhex(key)[:8], "little"), int.from_bytes(bytes.fromhex(key)[8:], "little")
    words = [w for block in range(1, 4) for w in _philox4x64_block((block, 0, 0, 0), (k0, k1))]
    expected = []
    for i in range(2):
        group = words[6 * i: 6 * i + 6]
        total = sum(w & 0xFFFFFFFF for w in group) + sum(w >> 32 for w in group)
        expected.append(np.float32(total / 2**32 - 6.0))
    got = erase_noise(key, (1, 1, 2))
    assert got.dtype == torch.float32 and got.flatten().tolist() == [float(v) for v in expected]
    big = erase_noise(key, (3, 64, 64))
    assert abs(big.mean().item()) < 0.03 and abs(big.std().item() - 1.0) < 0.03
    assert not torch.equal(big, erase_noise(key[::-1], (3, 64, 64)))


def test_erase_noise_golden_values():
    """Pinned numbers, written in docs/format.md too: another implementation can check itself against them."""
    values = erase_noise("000102030405060708090a0b0c0d0e0f", (4,)).tolist()
    assert values == [0.5445847511291504, 0.8118807077407837, 0.2371831089258194, 0.43157118558883667]


def test_erase_matches_torchvision_erase_with_timms_box():
    x = torch.randn(3, 32, 32)
    e = Erase((3, 5, 20, 12), "pixel", "ab" * 16)
    got = e.apply(x.clone())
    expected = x.clone()
    expected[:, 5:12, 3:20] = erase_noise("ab" * 16, (3, 7, 17))
    assert torch.equal(got, expected)
    const = Erase((0, 0, 4, 4), "const").apply(x.clone())
    assert torch.equal(const[:, :4, :4], torch.zeros(3, 4, 4)) and torch.equal(const[:, 4:], x[:, 4:])


# ---------------------------------------------------------------------------------------------------------------
# mixup / cutmix: timm's box arithmetic, Mixup's pixels and mixup_target's labels


def test_cutmix_box_is_timms_rand_bbox_and_corrected_lambda():
    from timm.data import mixup as timm_mixup

    a = Augmentation(cutmix=1.0)
    for seed in range(200):
        rng = np.random.default_rng(seed)
        lam, box = draw_mix(rng, a, 32)
        # replay the same draws through timm: beta for lam, then rand_bbox's two randints
        rng = np.random.default_rng(seed)
        rng.random()  # mix_prob draw
        raw_lam = float(rng.beta(1.0, 1.0))
        cy, cx = int(rng.integers(0, 32)), int(rng.integers(0, 32))
        with mock.patch.object(np.random, "randint", side_effect=[cy, cx]):
            (yl, yh, xl, xh), timm_lam = timm_mixup.cutmix_bbox_and_lam((2, 3, 32, 32), raw_lam, correct_lam=True)
        assert box == (xl, yl, xh, yh) and lam == timm_lam


@pytest.mark.parametrize("cutmix", [False, True])
def test_mixed_pixels_and_labels_equal_timms_mixup(cutmix):
    """Our mix of (view, partner) == row 0 of timm's Mixup on the batch [view, partner] (mode 'batch' pairs
    i with B-1-i), with timm's draws pinned to the stored lam and box; labels == timm's mixup_target row 0."""
    from timm.data import mixup as timm_mixup
    from timm.data.mixup import Mixup

    from attncache.train.losses import mixed_targets

    img, other = _img(48, 40, 1), _img(40, 56, 2)
    base = View(box=(2.0, 3.0, 40.0, 37.0), flip=True)
    partner_view = View(box=(0.0, 10.0, 30.0, 50.0))
    lam, box = (0.6875, (4, 6, 20, 22)) if cutmix else (0.37, None)
    view = replace(base, mix=Mix("p", partner_view, lam, box))
    got = render(img, view, 32, "bicubic", MEAN, STD, partner=other)

    batch = torch.stack([render(img, base, 32, "bicubic", MEAN, STD),
                         render(other, partner_view, 32, "bicubic", MEAN, STD)])
    mixer = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode="batch", label_smoothing=0.1, num_classes=5)
    target = torch.tensor([1, 3])
    with mock.patch.object(Mixup, "_params_per_batch", return_value=(lam, cutmix)), \
            mock.patch.object(timm_mixup, "cutmix_bbox_and_lam",
                              return_value=((box[1], box[3], box[0], box[2]), lam) if cutmix else None):
        mixed, timm_targets = mixer(batch.clone(), target)
    assert torch.equal(got, mixed[0])
    ours = mixed_targets(target[:1], target[1:], torch.tensor([lam], dtype=torch.float64), 5, 0.1)
    torch.testing.assert_close(ours, timm_targets[:1].to(ours.dtype), rtol=0, atol=1e-7)


def test_a_mixed_view_without_its_partner_is_an_error():
    view = View(box=(0.0, 0.0, 32.0, 32.0), mix=Mix("p", View(box=(0.0, 0.0, 32.0, 32.0)), 0.5))
    with pytest.raises(AttncacheError, match="partner 'p'"):
        render(_img(), view, 32, "bicubic", MEAN, STD)


# ---------------------------------------------------------------------------------------------------------------
# property: any policy's views survive JSON exactly and render to the same pixels


policies = st.builds(
    Augmentation,
    randaugment=st.sampled_from([None, "rand-m9-mstd0.5-inc1", "rand-m5-n3-mstd1", "rand-m10-mstd101-inc1",
                                 "rand-m7-n1-p1.0"]),
    erase_prob=st.sampled_from([0.0, 0.5, 1.0]), erase_mode=st.sampled_from(["pixel", "const"]),
    erase_count=st.integers(1, 3), mixup=st.sampled_from([0.0, 0.8]), cutmix=st.sampled_from([0.0, 1.0]),
    mix_prob=st.sampled_from([0.5, 1.0]), mix_switch=st.sampled_from([0.0, 0.5, 1.0]))


@settings(max_examples=40, deadline=None)
@given(augment=policies, seed=st.integers(0, 2**31), size=st.sampled_from([16, 32, 33]))
def test_views_roundtrip_and_replay_bit_identically(augment, seed, size):
    samples = [{"key": f"k{i}", "width": w, "height": h}
               for i, (w, h) in enumerate([(48, 40), (33, 61), (70, 20)])]
    images = {s["key"]: _img(s["width"], s["height"], seed=i) for i, s in enumerate(samples)}
    policy = ViewPolicy(views_per_image=2, seed=seed, augment=augment)
    for row, view in enumerate(policy.views(samples, size, mean=MEAN)):
        stored = View.from_json(json.loads(json.dumps(view.to_json())))
        assert stored == view
        sample = samples[row % len(samples)]
        stored.check_bounds(sample["width"], sample["height"], size)
        partner = images[view.mix.partner] if view.mix else None
        a = render(images[sample["key"]], view, size, "bicubic", MEAN, STD, partner=partner)
        b = render(images[sample["key"]], stored, size, "bicubic", MEAN, STD, partner=partner)
        assert torch.equal(a, b) and torch.isfinite(a).all()
        if view.mix:
            assert view.mix.partner != sample["key"] and 0 <= view.mix.lam <= 1
        assert view.needs_version == (3 if augment != Augmentation() and (view.augment or view.erase or view.mix)
                                      else 1)


def test_augmentation_leaves_the_crops_as_they_were():
    plain = ViewPolicy(views_per_image=3, seed=5).draw("a", 64, 48, 32)
    augmented = ViewPolicy(views_per_image=3, seed=5, augment=RECIPE_AUG).draw("a", 64, 48, 32)
    assert [(v.box, v.flip) for v in plain] == [(v.box, v.flip) for v in augmented]


def test_bad_augmentation_options_fail_before_work():
    for kw, match in ((dict(randaugment="autoaug-v0"), "RandAugment string"),
                      (dict(randaugment="rand-m9-zz3"), "timm accepts"), (dict(erase_prob=2.0), "^`erase_prob` 2.0"),
                      (dict(erase_mode="rand"), "^`erase_mode` 'rand'"), (dict(mixup=-1.0), "^`mixup` -1.0"),
                      (dict(mix_switch=1.5), "^`mix_switch` 1.5")):
        with pytest.raises(AttncacheError, match=match):
            Augmentation(**kw)
    with pytest.raises(AttncacheError, match="^`split` val"):
        ViewPolicy(split="val", augment=Augmentation(mixup=0.8))


# ---------------------------------------------------------------------------------------------------------------
# the cache: maps of augmented/mixed views equal a live teacher on the independently composed image


def reference_maps_with_drop_path(model: torch.nn.Module, x: torch.Tensor, layers, keep: torch.Tensor,
                                  rate: float) -> torch.Tensor:
    """timm's own modules, run block by block by hand with the plain stochastic-depth formula
    x + keep / (1 - rate) * branch on both residual branches; probs from timm's non-fused attention path."""
    import copy

    model = copy.deepcopy(model).eval()
    probs = {}
    for i in layers:
        attn = model.blocks[i].attn
        attn.fused_attn = False
        attn.attn_drop.register_forward_pre_hook(lambda m, a, i=i: probs.__setitem__(i, a[0].detach().clone()))
    with torch.no_grad():
        h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        for i, block in enumerate(model.blocks):
            scale = (keep[:, i].float() / (1.0 - rate))[:, None, None]
            h = h + scale * block.ls1(block.attn(block.norm1(h)))
            h = h + scale * block.ls2(block.mlp(block.norm2(h)))
    return torch.stack([probs[i] for i in layers], dim=1)


def _compose_independently(image: Image.Image, partner: Image.Image | None, view: View, spec) -> torch.Tensor:
    """The view's pixels from the ecosystem's pieces: PIL crop/flip, timm's op functions, torchvision's
    ToTensor + Normalize, the erase boxes assigned directly, and timm's Mixup on the pair."""
    from timm.data import mixup as timm_mixup
    from timm.data.auto_augment import NAME_TO_OP
    from timm.data.mixup import Mixup
    from torchvision import transforms as T

    def one(img: Image.Image, v: View) -> torch.Tensor:
        out = img.convert("RGB").resize((spec.image_size,) * 2, Image.BICUBIC, box=v.box)
        if v.flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        for op in v.augment:
            out = NAME_TO_OP[op.name](out, *op.args, fillcolor=op.fill, resample=Image.BICUBIC)
        x = T.Normalize(spec.mean, spec.std)(T.ToTensor()(out))
        for e in v.erase:
            left, top, right, bottom = e.box
            x[:, top:bottom, left:right] = erase_noise(e.key, (3, bottom - top, right - left)) \
                if e.fill == "pixel" else 0.0
        return x

    x = one(image, view)
    if view.mix is None:
        return x
    m = view.mix
    pair = torch.stack([x, one(partner, m.view)])
    bbox = ((m.box[1], m.box[3], m.box[0], m.box[2]), m.lam) if m.box else None
    with mock.patch.object(Mixup, "_params_per_batch", return_value=(m.lam, m.box is not None)), \
            mock.patch.object(timm_mixup, "cutmix_bbox_and_lam", return_value=bbox):
        mixed, _ = Mixup(mixup_alpha=1.0, num_classes=3)(pair, torch.tensor([0, 1]))
    return mixed[0]


@pytest.mark.parametrize("store", ["recipe_zarr", "recipe_wds"])
def test_cached_maps_equal_live_teacher_on_independently_composed_views(request, store, tiny_teacher,
                                                                        image_folder):
    cache = open_cache(str(request.getfixturevalue(store)))
    assert cache.manifest["version"] == 5
    assert cache.policy.augment == (RECIPE_AUG if store == "recipe_zarr" else DISTILL_AUG)
    model, spec = tiny_teacher.timm_model(), cache.teacher
    files = {p.relative_to(image_folder).as_posix(): p for p in image_folder.rglob("*") if p.is_file()}
    kinds = {"augment": 0, "erase": 0, "mixup": 0, "cutmix": 0}
    xs = []
    for row in range(len(cache)):
        item = cache.item(row)
        v = item.view
        kinds["augment"] += bool(v.augment)
        kinds["erase"] += bool(v.erase)
        kinds["mixup"] += v.mix is not None and v.mix.box is None
        kinds["cutmix"] += v.mix is not None and v.mix.box is not None
        partner = Image.open(files[v.mix.partner]) if v.mix else None
        xs.append(_compose_independently(Image.open(files[item.key]), partner, v, spec))
    assert all(kinds.values()), kinds  # the cache exercises every kind of op
    got = cache.read_rows(list(range(len(cache))))
    masks = [cache.view(r).drop_path for r in range(len(cache))]
    if store == "recipe_zarr":
        assert not any(masks)
        expected = reference_maps(model, torch.stack(xs), cache.layers)
    else:
        keep = torch.tensor([m.keep for m in masks])
        assert keep.shape == (len(cache), 2) and 0 < keep.float().mean() < 1  # some blocks dropped
        expected = reference_maps_with_drop_path(model, torch.stack(xs), cache.layers, keep, 0.2)
        # the masks matter: without them, the maps of views whose block 0 was dropped differ
        plain = reference_maps(model, torch.stack(xs), cache.layers)
        dropped = ~keep[:, 0]
        assert dropped.any() and (plain[dropped] - got[dropped]).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def _render_in_subprocess(cache: Path, data: Path, workers: int, out: Path) -> None:
    code = f"""
import torch
from attncache.cache import open_cache
from attncache.sources import open_source
from attncache.train.loader import RenderSpec, ViewStream, batches, make_loader
cache = open_cache({str(cache)!r})
stream = ViewStream(cache=cache, render_spec=RenderSpec.of(cache.teacher), batch_size=2, shuffle=True, seed=4,
                    with_maps=False, source=open_source({str(data)!r}))
images, lams = {{}}, {{}}
for epoch in range(3):
    stream.set_position(epoch, 0)
    for b in batches(make_loader(stream, {workers})):
        for r, x, lam in zip(b["rows"].tolist(), b["images"], b["lam"].tolist()):
            images[r], lams[r] = x.clone(), lam
torch.save({{"images": images, "lams": lams}}, {str(out)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


@pytest.mark.long
def test_training_pixels_equal_extraction_pixels_with_any_worker_count(tmp_path, tiny_teacher, image_folder):
    """What the teacher saw at extraction (recorded in-process) == what training renders, in other processes
    with 0 and 2 workers, bit for bit, for every record of every epoch."""
    import attncache.extract.pipeline as pipeline

    seen = {}
    real_render = pipeline.render

    def recording(image, view, *args, **kw):
        x = real_render(image, view, *args, **kw)
        seen[json.dumps(view.to_json(), sort_keys=True)] = x.clone()
        return x

    out = tmp_path / "cache"
    with mock.patch.object(pipeline, "render", recording):
        extract(tiny_teacher.config(image_folder, out, views=3, codec="fp16", augment=RECIPE_AUG, seed=9))
    cache = open_cache(str(out))
    runs = []
    for workers in (0, 2):
        _render_in_subprocess(out, image_folder, workers, tmp_path / f"w{workers}.pt")
        runs.append(torch.load(tmp_path / f"w{workers}.pt"))
    assert runs[0]["images"].keys() == runs[1]["images"].keys() == set(range(len(cache)))
    for row in range(len(cache)):
        key = json.dumps(cache.view(row).to_json(), sort_keys=True)
        assert torch.equal(runs[0]["images"][row], seen[key]) and torch.equal(runs[1]["images"][row], seen[key])
        v = cache.view(row)
        assert runs[0]["lams"][row] == (v.mix.lam if v.mix else 1.0)


# ---------------------------------------------------------------------------------------------------------------
# training: cache == live teacher step for step with the full recipe; recipes; layer decay


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


@pytest.mark.parametrize("recipe,store", [("at-copy", "recipe_zarr"), ("at-distill", "recipe_wds")])
def test_recipe_from_cache_equals_live_teacher_step_for_step(request, tmp_path, recipe, store, tiny_teacher,
                                                             image_folder):
    from safetensors.torch import load_file

    cache = request.getfixturevalue(store)
    val = tmp_path / "val"
    extract(tiny_teacher.config(image_folder, val, split="val", codec="fp32"))
    common = dict(cache=str(cache), data=str(image_folder), val_cache=str(val), val_data=str(image_folder),
                  epochs=2, batch_size=2, workers=0, progress=False, log_every=1, layers="0-1", lr=1e-3,
                  warmup_epochs=0.5)
    cached = train(train_config(recipe, out=str(tmp_path / "cached"), **common))
    live = train(train_config(recipe, out=str(tmp_path / "live"), teacher=tiny_teacher.options(), **common))
    a, b = _losses(tmp_path / "cached"), _losses(tmp_path / "live")
    assert cached["steps"] == live["steps"] == 6 and len(a) == 6
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-6 and a[0] != a[-1]
    wa, wb = load_file(str(tmp_path / "cached" / "model.safetensors")), load_file(
        str(tmp_path / "live" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)
    config = json.loads((tmp_path / "cached" / "config.json").read_text())["options"]
    r = RECIPES[recipe]
    assert config["layer_decay"] == r.layer_decay and config["ema"] == r.ema and config["beta2"] == r.beta2
    assert config["drop_path"] == r.drop_path and config["augment"]["randaugment"] == "rand-m9-mstd0.5-inc1"


def test_cache_without_the_recipes_views_is_refused(tmp_path, folder_fp32_zarr, recipe_zarr, recipe_wds,
                                                    image_folder):
    with pytest.raises(AttncacheError, match="other augmentation.*randaugment"):
        train(train_config("at-distill", out=str(tmp_path / "r"), cache=str(folder_fp32_zarr),
                           data=str(image_folder), workers=0, progress=False))
    with pytest.raises(AttncacheError, match="teacher_drop_path 0.0 \\(asked: 0.2\\)"):  # at-copy's views
        train(train_config("at-distill", out=str(tmp_path / "r"), cache=str(recipe_zarr),
                           data=str(image_folder), workers=0, progress=False))
    with pytest.raises(AttncacheError, match="drop-path masks at rate 0.2: train with `drop_path` 0.2"):
        train(train_config(None, mode="distill", out=str(tmp_path / "r"), cache=str(recipe_wds), workers=0,
                           progress=False))
    assert not (tmp_path / "r").exists()


def test_the_students_transferred_blocks_reuse_the_teachers_masks(tmp_path, recipe_wds):
    """Same batch, same RNG: the step depends on the stored masks of the transferred blocks (and equals a step
    whose masks are installed by hand)."""
    from attncache.train.trainer import Trainer

    cfg = train_config(None, mode="distill", out=str(tmp_path / "r"), cache=str(recipe_wds), workers=0,
                       progress=False, drop_path=0.2, layers="0", batch_size=4)
    trainer = Trainer(cfg, evaluate=False)
    batch = trainer.train_stream.load(0, trainer.train_stream.plan(0)[0])
    keep = batch["drop_path_keep"]
    assert keep.shape == (4, 2)

    def loss_with(k):
        torch.manual_seed(0)
        model = trainer.model
        model.train()
        images, labels, targets = trainer.engine.to_device({**batch, "drop_path_keep": k})
        from attncache.teacher import drop_path_masks
        from attncache.train.student import student_forward

        with drop_path_masks(model, k, 0.2, blocks=[0]):
            out, recorded = student_forward(model, images, [0], "record", targets)
        return out.detach(), recorded[0].detach()

    same = loss_with(keep)
    flipped = loss_with(~keep)
    assert not torch.equal(same[0], flipped[0])
    # block 0's own mask cannot change block 0's attention (it acts after it); it changes the output
    assert torch.equal(same[1], flipped[1])

    # the engine's training step installs the batch's masks: the step's loss follows them
    engine, start = trainer.engine, {k: v.clone() for k, v in trainer.model.state_dict().items()}

    def step(k):
        trainer.model.load_state_dict(start)
        engine.init_state()
        torch.manual_seed(0)  # the non-transferred block draws its own mask: the same one each time
        return engine.train_step({**batch, "drop_path_keep": k}, 1e-3)["loss"].item()

    assert step(keep) == step(keep) != step(~keep)


def test_recipe_values_and_overrides():
    c = train_config("at-copy", out="x", batch_size=512)
    assert (c.mode, c.epochs, c.warmup_epochs, c.lr, c.min_lr) == ("copy", 100, 5, 2e-3, 5e-4)
    assert (c.weight_decay, c.layer_decay, c.drop_path, c.ema, c.label_smoothing) == (0.05, 0.75, 0.0, 0.9999, 0.1)
    d = train_config("at-distill", out="x", batch_size=2048)
    assert (d.lr, d.min_lr, d.beta2, d.weight_decay, d.drop_path, d.layer_decay) == (
        8e-4, pytest.approx(1e-6), 0.95, 0.3, 0.2, None)
    o = train_config("at-copy", out="x", lr=0.1, epochs=3, mixup=0.0, mode="distill")
    assert (o.lr, o.min_lr, o.epochs, o.mode, o.augment.mixup, o.augment.cutmix) == (0.1, 0.025, 3, "distill",
                                                                                      0.0, 1.0)
    e = extract_config("at-copy", teacher=None, data="d", out="o", erase_prob=0.0)
    assert e.augment == replace(RECIPE_AUG, erase_prob=0.0)


def test_layer_decay_scales_each_layers_lr_as_timm_does(tmp_path, tiny_teacher, image_folder):
    from timm.optim import param_groups_layer_decay

    from attncache.train.trainer import Trainer

    cfg = train_config(None, mode="scratch", out=str(tmp_path / "r"), data=str(image_folder),
                       teacher=tiny_teacher.options(pretrained=False, weights=None), batch_size=2, workers=0,
                       progress=False, layer_decay=0.5, lr=1e-2)
    trainer = Trainer(cfg, evaluate=False)
    engine = trainer.engine
    engine.init_state()
    batch = trainer.train_stream.load(0, trainer.train_stream.plan(0)[0])
    engine.train_step(batch, 1e-2)
    expected = param_groups_layer_decay(trainer.model, cfg.weight_decay, trainer.model.no_weight_decay(),
                                        layer_decay=0.5)
    scales = sorted({g["lr_scale"] for g in expected})
    assert len(scales) == 4  # embeddings, 2 blocks, head (depth 2)
    got = sorted({g["lr"] for g in engine.optimizer.param_groups})
    assert got == pytest.approx([1e-2 * s for s in scales])


# ---------------------------------------------------------------------------------------------------------------
# bad and hostile view parameters, on the read path


def _rewrite_views(root: Path, edit) -> None:
    """Edit the views of a cache rewritten as format version 4 (JSON views: `edit` may write any JSON)."""
    as_version_4(root)
    lines = (root / "views.jsonl").read_text().splitlines()
    lines = [json.dumps(edit(json.loads(line), i)) for i, line in enumerate(lines)]
    data = ("\n".join(lines) + "\n").encode()
    (root / "views.jsonl").write_bytes(data)
    m = json.loads((root / "manifest.json").read_text())
    m["files"]["views.jsonl"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (root / "manifest.json").write_text(json.dumps(seal(m)))


HOSTILE_VIEWS = {
    "unknown op": (lambda v: v.__setitem__("augment", [{"op": "Exec", "magnitude": 1.0, "args": [],
                                                         "fill": [0, 0, 0], "resample": "bicubic"}]), "Exec"),
    "huge arg": (lambda v: v.__setitem__("augment", [{"op": "Rotate", "magnitude": 1.0, "args": [1e308],
                                                      "fill": [0, 0, 0], "resample": "bicubic"}]), "out of range"),
    "nan magnitude": (lambda v: v.__setitem__("augment", [{"op": "Invert", "magnitude": float("nan"), "args": [],
                                                           "fill": [0, 0, 0], "resample": "bicubic"}]), "NaN"),
    "erase outside": (lambda v: v.__setitem__("erase", [{"box": [0, 0, 33, 4], "fill": "const"}]), "outside"),
    "huge erase": (lambda v: v.__setitem__("erase", [{"box": [0, 0, 10**9, 10**9], "fill": "pixel",
                                                      "key": "00" * 16}]), "outside"),
    "bad key": (lambda v: v.__setitem__("erase", [{"box": [0, 0, 3, 4], "fill": "pixel", "key": "x"}]), "key"),
    "unknown partner": (lambda v: v.__setitem__("mix", {"partner": "../../etc/passwd", "lam": 0.5,
                                                        "view": {"box": [0.0, 0.0, 8.0, 8.0], "flip": False}}),
                        "not a sample"),
    "lam above 1": (lambda v: v.__setitem__("mix", {"partner": "ant/a0.png", "lam": 1.5,
                                                    "view": {"box": [0.0, 0.0, 8.0, 8.0], "flip": False}}), "lam"),
    "nested mix": (lambda v: v.__setitem__("mix", {"partner": "ant/a0.png", "lam": 0.5, "view": {
        "box": [0.0, 0.0, 8.0, 8.0], "flip": False,
        "mix": {"partner": "ant/a0.png", "lam": 0.5, "view": {"box": [0.0, 0.0, 8.0, 8.0]}}}}), "cannot itself"),
    "partner box outside": (lambda v: v.__setitem__("mix", {"partner": "ant/a0.png", "lam": 0.5,
                                                            "view": {"box": [0.0, 0.0, 80.0, 8.0], "flip": False}}),
                            "outside"),
    "unknown field": (lambda v: v.__setitem__("exec", "rm -rf /"), "not supported"),
}


@pytest.mark.parametrize("what", sorted(HOSTILE_VIEWS))
def test_hostile_view_parameters_are_refused_on_open(tmp_path, recipe_zarr, what):
    import shutil

    root = tmp_path / "c"
    shutil.copytree(recipe_zarr, root)
    edit, match = HOSTILE_VIEWS[what]
    _rewrite_views(root, lambda v, i: (edit(v), v)[1] if i == 1 else v)
    with pytest.raises(CacheFormatError, match=f"views.jsonl: line 2: .*{match}"):
        open_cache(str(root)).records  # noqa: B018


def test_views_of_a_newer_kind_need_format_version_3(tmp_path, folder_fp16_wds):
    import shutil

    root = tmp_path / "c"
    shutil.copytree(folder_fp16_wds, root)
    as_version_4(root)
    m = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps(seal({**m, "version": 1})))  # as a version-1 cache states it
    _rewrite_views(root, lambda v, i: {**v, "erase": [{"box": [0, 0, 3, 4], "fill": "const"}]} if i == 0 else v)
    with pytest.raises(CacheFormatError, match="line 1: .*version 3"):
        open_cache(str(root)).records  # noqa: B018


def test_mixing_from_a_streamed_source_fails_before_the_teacher_runs(tmp_path, tiny_teacher):
    with pytest.raises(AttncacheError, match="pipe"):
        extract(tiny_teacher.config("pipe:cat /nonexistent.tar", tmp_path / "c", augment=RECIPE_AUG))
    assert not (tmp_path / "c").exists()


def test_an_interrupted_recipe_extraction_resumes_to_the_same_cache(tmp_path, tiny_teacher, image_folder):
    """Views (ops, partners, masks) are pure functions of (seed, key, view): a resumed run redraws the same ones
    and its cache equals an uninterrupted run's, record for record."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    kw = dict(views=2, codec="fp32", augment=DISTILL_AUG, seed=5, records_per_shard=4)
    extract(tiny_teacher.config(image_folder, straight, **kw))

    def stop_after_first(shard):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(tiny_teacher.config(image_folder, resumed, **kw), on_shard=stop_after_first)
    assert not (resumed / "manifest.json").exists()
    stats = {}
    extract(tiny_teacher.config(image_folder, resumed, **kw), stats=stats)
    assert 0 < stats["records"] < 12  # only the shards left were extracted
    for name in TABLES:
        assert (straight / name).read_bytes() == (resumed / name).read_bytes()
    a, b = open_cache(str(straight)), open_cache(str(resumed))
    assert torch.equal(a.read_rows(list(range(12))), b.read_rows(list(range(12))))

"""Shared fixtures: tiny real timm teachers saved to local files, a tiny ImageFolder, and a few tiny caches.

Everything expensive is session-scoped and kept small so the whole suite runs in well under a few minutes on 2 CPU
cores. References for attention maps come from timm itself (its explicit, non-fused attention path), not from
attncache.
"""

from __future__ import annotations

import copy
import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from attncache.extract import ExtractConfig, extract
from attncache.recipes import RECIPES
from attncache.sources import open_image
from attncache.teacher import TeacherOptions
from attncache.views import View, render

torch.set_num_threads(2)


@dataclass(frozen=True)
class TinyTeacher:
    name: str  # timm name given to attncache
    image_size: int
    args: dict  # timm kwargs besides img_size
    weights: Path  # local safetensors file

    def options(self, **kw) -> TeacherOptions:
        """This teacher as the API takes it: local weights."""
        base = dict(name=self.name, weights=str(self.weights), image_size=self.image_size, args=dict(self.args))
        return TeacherOptions(**{**base, **kw})

    def config(self, data, out, teacher: TeacherOptions | None = None, **kw) -> ExtractConfig:
        """An ExtractConfig for this teacher: local weights, quiet, small batches."""
        base = dict(teacher=teacher or self.options(), data=str(data), out=str(out), batch_size=4, workers=1,
                    progress=False)
        return ExtractConfig(**{**base, **kw})

    def cli_args(self) -> list[str]:
        args = ["--teacher", self.name, "--weights", str(self.weights), "--image-size", str(self.image_size),
                "--quiet", "--batch-size", "4", "--workers", "1"]
        for k, v in self.args.items():
            args += ["--teacher-arg", f"{k}={v}"]
        return args

    def timm_model(self) -> torch.nn.Module:
        """The same teacher built by timm directly (not through attncache) with the saved weights."""
        model = timm.create_model(self.name, pretrained=False, num_classes=0, img_size=self.image_size, **self.args)
        model.load_state_dict(load_file(str(self.weights)), strict=True)
        return model.eval()


TINY_VIT = dict(name="vit_tiny_patch16_224", image_size=32, args=dict(patch_size=8, depth=2, embed_dim=64, num_heads=4))
TINY_REG = dict(name="vit_small_patch14_reg4_dinov2", image_size=28, args=dict(depth=2, embed_dim=64, num_heads=2))


def _save_teacher(spec: dict, path: Path, seed: int = 0) -> TinyTeacher:
    model, _ = TeacherOptions(spec["name"], image_size=spec["image_size"], pretrained=False,
                              args=spec["args"]).build()
    if seed:  # a second, different set of weights of the same architecture
        g = torch.Generator().manual_seed(seed)
        model.load_state_dict({k: torch.randn(v.shape, generator=g) * 0.05 if v.is_floating_point() else v
                               for k, v in model.state_dict().items()})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return TinyTeacher(spec["name"], spec["image_size"], dict(spec["args"]), path)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> TinyTeacher:
    """Random-init ViT: 32 px images, 8 px patches (16 patches + CLS = 17 tokens), 2 blocks, 4 heads."""
    return _save_teacher(TINY_VIT, tmp_path_factory.mktemp("teacher") / "tiny_vit.safetensors")


@pytest.fixture(scope="session")
def other_tiny_teacher(tmp_path_factory) -> TinyTeacher:
    """Same architecture as tiny_teacher, different weights."""
    return _save_teacher(TINY_VIT, tmp_path_factory.mktemp("teacher2") / "tiny_vit_b.safetensors", seed=7)


@pytest.fixture(scope="session")
def reg_teacher(tmp_path_factory) -> TinyTeacher:
    """DINOv2 layout with 4 registers and LayerScale: 28 px, patch 14 -> 1 CLS + 4 registers + 4 patches."""
    return _save_teacher(TINY_REG, tmp_path_factory.mktemp("teacher_reg") / "tiny_reg.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# images

# (class, file name, size, mode, format): non-square sizes, one grayscale image, PNG and JPEG.
FOLDER_IMAGES = [
    ("ant", "a0.png", (40, 40), "RGB", "PNG"),
    ("ant", "a1.jpg", (57, 33), "RGB", "JPEG"),
    ("bee", "b0.png", (31, 64), "RGB", "PNG"),
    ("bee", "b1.png", (45, 50), "L", "PNG"),
    ("cat", "c0.jpg", (70, 48), "RGB", "JPEG"),
    ("cat", "c1.png", (36, 36), "RGB", "PNG"),
]


def image_bytes(size, mode="RGB", fmt="PNG", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    channels = 1 if mode == "L" else 3
    # smooth gradient + noise: something with structure, so flips and crops are visible
    yy, xx = np.mgrid[0:h, 0:w]
    base = (xx * 255 // max(1, w - 1))[..., None] * np.ones(channels) * 0.6 + (yy * 80 // max(1, h - 1))[..., None]
    pixels = np.clip(base + rng.integers(0, 60, (h, w, channels)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_image_folder(root: Path, images=FOLDER_IMAGES) -> Path:
    for i, (cls, name, size, mode, fmt) in enumerate(images):
        (root / cls).mkdir(parents=True, exist_ok=True)
        (root / cls / name).write_bytes(image_bytes(size, mode, fmt, seed=i))
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images") / "folder")


# ---------------------------------------------------------------------------------------------------------------
# independent reference: timm's own explicit attention path


def reference_maps(model: torch.nn.Module, x: torch.Tensor, layers, payload: str = "probs") -> torch.Tensor:
    """(B, L, H, N, N) maps from timm's non-fused attention, with no attncache code involved.

    probs: the input of each block's `attn.attn_drop` (timm's own softmax probabilities).
    logits: recomputed with the plain formula from each captured block's attention input
            (qkv linear -> q * scale @ kᵀ), which the assertions cross-check against the probs.
    """
    model = copy.deepcopy(model).eval()
    probs, inputs = {}, {}
    handles = []
    for i in layers:
        attn = model.blocks[i].attn
        attn.fused_attn = False
        handles.append(attn.attn_drop.register_forward_pre_hook(
            lambda m, a, i=i: probs.__setitem__(i, a[0].detach().clone())))
        handles.append(attn.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach())))
    with torch.no_grad():
        model.forward_features(x)
    for h in handles:
        h.remove()
    if payload == "probs":
        return torch.stack([probs[i] for i in layers], dim=1)
    out = []
    for i in layers:
        attn = model.blocks[i].attn
        assert isinstance(attn.q_norm, torch.nn.Identity) and isinstance(attn.k_norm, torch.nn.Identity)
        t = inputs[i]
        b, n, c = t.shape
        qkv = torch.nn.functional.linear(t, attn.qkv.weight, attn.qkv.bias)
        qkv = qkv.reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        logits = (q * attn.head_dim ** -0.5) @ k.transpose(-2, -1)
        # the recomputed logits must reproduce timm's own probabilities
        torch.testing.assert_close(logits.softmax(-1), probs[i], rtol=0, atol=1e-6)
        out.append(logits)
    return torch.stack(out, dim=1)


def render_sample(data: bytes, view: View | dict, teacher) -> torch.Tensor:
    """Pixels of one view, with the teacher geometry of a TeacherSpec or a manifest's teacher section."""
    if isinstance(view, dict):
        view = View.from_json({k: v for k, v in view.items() if k not in ("sample", "view")})
    t = teacher if isinstance(teacher, dict) else teacher.__dict__
    return render(open_image(data, "test"), view, t["image_size"], t["interpolation"], t["mean"], t["std"])


# ---------------------------------------------------------------------------------------------------------------
# tiny caches shared by several test modules (read-only for the tests that use them)


@pytest.fixture(scope="session")
def folder_fp32_zarr(tmp_path_factory, tiny_teacher, image_folder) -> Path:
    """6 images x 2 train views, fp32 codec, zarr, 5 records per shard (3 shards, the last one short)."""
    out = tmp_path_factory.mktemp("caches") / "fp32_zarr"
    extract(tiny_teacher.config(image_folder, out, views=2, codec="fp32", records_per_shard=5))
    return out


@pytest.fixture(scope="session")
def folder_fp16_zarr(tmp_path_factory, tiny_teacher, image_folder) -> Path:
    out = tmp_path_factory.mktemp("caches") / "fp16_zarr"
    extract(tiny_teacher.config(image_folder, out, views=2, codec="fp16", records_per_shard=5))
    return out


@pytest.fixture(scope="session")
def folder_fp16_wds(tmp_path_factory, tiny_teacher, image_folder) -> Path:
    out = tmp_path_factory.mktemp("caches") / "fp16_wds"
    extract(tiny_teacher.config(image_folder, out, views=2, codec="fp16", records_per_shard=5, format="wds",
                                embed_images=True))
    return out


@pytest.fixture
def zarr_copy(tmp_path, folder_fp16_zarr) -> Path:
    """A private copy of the fp16 zarr cache, for tests that damage or forge it."""
    return Path(shutil.copytree(folder_fp16_zarr, tmp_path / "zarr"))


@pytest.fixture
def wds_copy(tmp_path, folder_fp16_wds) -> Path:
    """A private copy of the fp16 wds cache (images embedded), for tests that damage or forge it."""
    return Path(shutil.copytree(folder_fp16_wds, tmp_path / "wds"))


@pytest.fixture(scope="session")
def recipe_zarr(tmp_path_factory, tiny_teacher, image_folder) -> Path:
    """6 images x 3 views with the reference recipe's augmentation and mixing, fp32 maps."""
    out = tmp_path_factory.mktemp("caches") / "recipe_zarr"
    extract(tiny_teacher.config(image_folder, out, views=3, codec="fp32", augment=RECIPES["at-copy"].augment, seed=3))
    return out


@pytest.fixture(scope="session")
def recipe_wds(tmp_path_factory, tiny_teacher, image_folder) -> Path:
    """The distill recipe's views (with teacher drop-path masks), webdataset with embedded images."""
    out = tmp_path_factory.mktemp("caches") / "recipe_wds"
    extract(tiny_teacher.config(image_folder, out, views=3, codec="fp32", augment=RECIPES["at-distill"].augment, seed=3,
                                format="wds", embed_images=True, records_per_shard=4))
    return out


# ---------------------------------------------------------------------------------------------------------------
# older format versions, made from a cache this version wrote


def as_version_4(root: Path) -> None:
    """Rewrite the cache at `root` in place as format version 4 stored it: `samples.jsonl` and `views.jsonl` (one
    JSON object per image and per record) instead of the record tables. The tests of the JSONL read path (caches
    written before version 5) and of hostile JSON views run on these."""
    import hashlib
    import json

    from attncache import open_cache
    from attncache.files import dumps_canonical
    from attncache.store.format import sample_and_view, seal
    from attncache.store.records import TABLES

    root = Path(root)
    if (root / "views.jsonl").exists():
        return
    cache = open_cache(str(root))
    samples = b"".join(dumps_canonical(cache.sample_at(i)) + b"\n" for i in range(cache.num_samples))
    views = b"".join(dumps_canonical(dict(zip(("sample", "view"), sample_and_view(r, cache.num_samples), strict=True),
                                          **cache.view(r).to_json())) + b"\n" for r in range(len(cache)))
    m = json.loads((root / "manifest.json").read_text())
    for name in TABLES:
        (root / name).unlink()
        del m["files"][name]
    for name, data in (("samples.jsonl", samples), ("views.jsonl", views)):
        (root / name).write_bytes(data)
        m["files"][name] = {"path": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (root / "manifest.json").write_text(json.dumps(seal({**m, "version": 4}), indent=2))

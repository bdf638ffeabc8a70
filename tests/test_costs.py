"""`attncache plan` (attncache/tools/costs.py) against real caches, real FLOP counts and the CLI."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import zarr
from attncache_cli.main import app
from conftest import make_image_folder
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from attncache.codecs import SideFileInputs, get_codec
from attncache.extract import extract
from attncache.tools import costs

# A second image set for the same teacher: other sizes, so other pixels (make_image_folder seeds by position)
OTHER_IMAGES = [("dog", f"d{i}.png", (30 + 7 * i, 60 - 5 * i), "RGB", "PNG") for i in range(5)]


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def cache_pairs(tmp_path_factory, tiny_teacher, image_folder):
    """Per codec: a cache of the 6 test images x 2 views (the ratio is measured here) and one of 5 other images x
    3 views drawn with another seed (the one predicted)."""
    root = tmp_path_factory.mktemp("costs")
    other_images = make_image_folder(root / "other_images", OTHER_IMAGES)
    pairs = {}
    for codec in ("fp16", "cls", "inputs"):
        measured, predicted = root / f"{codec}_a", root / f"{codec}_b"
        extract(tiny_teacher.config(image_folder, measured, views=2, codec=codec))
        extract(tiny_teacher.config(other_images, predicted, views=3, codec=codec, seed=1))
        pairs[codec] = measured, predicted
    return pairs


def _plan(tiny_teacher, codec: str, **kw) -> dict:
    geometry = costs.timm_geometry(tiny_teacher.name, tiny_teacher.image_size, tiny_teacher.args)
    return costs.plan(costs.PlanInputs(geometry, layers="all", codecs=(codec,), **kw))


@pytest.mark.parametrize("codec", ["fp16", "cls", "inputs"])
def test_raw_bytes_are_the_stored_arrays(cache_pairs, tiny_teacher, codec):
    """The raw part is exact: the plan's raw bytes per view x records = the cache's arrays, uncompressed."""
    _, cache = cache_pairs[codec]
    manifest = json.loads((cache / "manifest.json").read_text())
    arrays = sum(zarr.open_array(str(cache / name), mode="r").nbytes for name in manifest["codec"]["fields"])
    row = _plan(tiny_teacher, codec, images=5, views=3)["codecs"][0]
    assert row["raw_bytes_per_view"] * manifest["store"]["records"] == arrays
    assert costs.measured_ratio(cache)["raw_bytes"] == arrays


@pytest.mark.parametrize("codec", ["fp16", "cls", "inputs"])
def test_compressed_bytes_predict_another_cache(cache_pairs, tiny_teacher, codec):
    """The ratio measured on one cache predicts the shard bytes of another cache of the same teacher (other images,
    views and view count) within 10 %."""
    measured, predicted = cache_pairs[codec]
    ratio = costs.measured_ratio(measured)["ratio"]
    row = _plan(tiny_teacher, codec, images=5, views=3, ratio=ratio)["codecs"][0]
    actual = costs.measured_ratio(predicted)["shard_bytes"]
    assert abs(row["shard_bytes"] / actual - 1) < 0.10, (row["shard_bytes"], actual)
    files = json.loads((predicted / "manifest.json").read_text())["files"]
    if codec == "inputs":  # the once-per-cache projections file, up to its small safetensors header
        assert 0 < files["teacher_qk.safetensors"]["bytes"] - row["side_file_bytes"] < 1024
    else:
        assert row["side_file_bytes"] == 0 and "teacher_qk.safetensors" not in files


def test_side_file_bytes_are_each_files_bytes_up_to_its_header():
    """The plan counts a codec's side files by each one's own estimate (`SideFile.nbytes`): on a committed
    `inputs_klt` cache, both files are their estimates plus a safetensors header of under 1 KiB."""
    from pathlib import Path

    from attncache.store.format import capture_shape

    manifest = json.loads((Path(__file__).parent / "data" / "inputs_klt_int32" / "zarr" / "manifest.json").read_text())
    codec, shape = get_codec(manifest["codec"]["name"], **manifest["codec"]["params"]), capture_shape(manifest)
    sizes = {side.name: manifest["files"][side.name]["bytes"] for side in codec.side_files}
    assert sorted(sizes) == ["inputs_basis.safetensors", "teacher_qk.safetensors"]
    assert all(0 < sizes[side.name] - side.nbytes(shape) < 1024 for side in codec.side_files)
    assert 0 < sum(sizes.values()) - costs.side_file_bytes(codec, shape) < 2048


@pytest.mark.parametrize("name, args, image_size", [
    ("vit_tiny_patch16_224", dict(patch_size=8, depth=3, embed_dim=96, num_heads=3), 64),  # 65 tokens
    ("vit_small_patch14_reg4_dinov2", dict(depth=2, embed_dim=64, num_heads=2), 56),  # CLS + 4 registers
])
def test_forward_flops_match_a_flop_counter(name, args, image_size):
    geometry = costs.timm_geometry(name, image_size, args)
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=image_size, **args).eval()
    for block in model.blocks:
        block.attn.fused_attn = False  # explicit q kᵀ and attn·v matmuls, which the counter sees
    x = torch.randn(1, 3, image_size, image_size)
    with torch.no_grad():
        counted = _flops(lambda: model(x))
    assert costs.vit_forward_flops(geometry) == pytest.approx(counted, rel=0.01)
    with torch.no_grad():  # a stopped-early forward (what extraction runs) counts only its blocks
        counted = _flops(lambda: model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True))
    assert costs.vit_forward_flops(geometry, blocks=1) == pytest.approx(counted, rel=0.01)


@pytest.mark.parametrize("spec", ["fp16", "cls", "qk", "lowrank:rank=8", "inputs", "inputs:bits=16"])
def test_decode_flops_match_a_flop_counter(tiny_teacher, spec):
    model = tiny_teacher.timm_model()
    layers = [0, 1]
    geometry = costs.timm_geometry(tiny_teacher.name, tiny_teacher.image_size, tiny_teacher.args)
    shape = geometry.capture_shape(len(layers))
    codec = costs.parse_codec(spec)
    if codec.side_files:
        teacher = SideFileInputs(model, layers, lambda count: pytest.fail("none of these codecs is fitted"))
        codec.bind({side.name: side.build(codec, teacher) for side in codec.side_files}, shape)
        codec.decode({k: torch.zeros((1, *f.shape), dtype=getattr(torch, f.dtype))
                      for k, f in codec.fields(shape).items()})  # folds the rotation into the projections, once
    fields = {k: torch.zeros((4, *f.shape), dtype=getattr(torch, f.dtype)) for k, f in codec.fields(shape).items()}
    assert 4 * costs.decode_flops(codec, shape) == _flops(lambda: codec.decode(fields))


def test_measured_table_matches_the_benchmark_ratios():
    """The table's ratios, applied at the geometry they were measured on, give the documented bytes back, and the
    documented ratio vs raw fp16 maps (docs/benchmarks.md) follows from them."""
    raw_fp16 = 12 * 6 * 257 * 257 * 2
    assert raw_fp16 == 9_511_056
    for spec, stored in costs.MEASURED_BYTES_PER_VIEW.items():
        codec = costs.parse_codec(spec)
        assert costs.measured_ratio_of(codec) * costs.raw_bytes(codec, costs.MEASURED_ON) == pytest.approx(stored)
    assert raw_fp16 / costs.MEASURED_BYTES_PER_VIEW["inputs_klt"] == pytest.approx(18.98, abs=0.01)
    assert costs.measured_ratio_of(get_codec("inputs_klt", step=0.02)) is not None  # defaults spelt out match
    assert costs.measured_ratio_of(get_codec("inputs_klt", fit=128)) is None


def test_paper_setting_figures():
    """MAE ViT-L/16, layers 0-20, ImageNet-1k x 4 views: 26 MB of raw fp16 maps per view, and the break-even."""
    result = costs.plan(costs.PlanInputs(costs.timm_geometry("mae_vitl"), codecs=("fp16", "inputs_klt")))
    assert result["layers"] == list(range(21)) and result["capture_shape"]["tokens"] == 197
    fp16, klt = result["codecs"]
    assert fp16["raw_bytes_per_view"] == 21 * 16 * 197 * 197 * 2
    n, d = 197, 1024
    assert result["teacher_forward_flops_per_view"] == 2 * 196 * 768 * d + 21 * (24 * n * d * d + 4 * n * n * d)
    assert klt["decode_flops_per_view"] == 21 * (4 * n * d * d + 2 * n * n * d)
    # without a read limit: extraction + n cached runs = n live runs at n = views T / (epochs (T - decode))
    t = result["teacher_forward_flops_per_view"]
    assert klt["break_even_runs"] == pytest.approx(4 * t / (200 * (t - klt["decode_flops_per_view"])))
    assert fp16["read_GBps_per_node"] == pytest.approx(fp16["bytes_per_view"] * 1000 * 8 / 1e9)
    starved = costs.plan(costs.PlanInputs(costs.timm_geometry("mae_vitl"), codecs=("fp16",), read_GBps_per_node=1))
    assert starved["codecs"][0]["break_even_runs"] is None  # reads slower than a live teacher: never pays


def _cli(*args):
    return CliRunner().invoke(app, ["plan", *map(str, args)], catch_exceptions=False)


def test_cli_json_every_codec():
    result = _cli("--codec", "all", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [r["codec"] for r in out["codecs"]] == list(costs.ALL_CODECS)
    for key in ("bytes_per_view", "cache_bytes", "read_GBps_per_gpu", "read_GBps_per_node", "decode_flops_per_view",
                "teacher_flops_saved_per_run", "break_even_runs", "ratio_source"):
        assert all(key in r for r in out["codecs"]), key
    table = _cli("--codec", "cls", "--markdown")
    assert table.exit_code == 0 and "| cls " in table.stdout


def test_cli_ratio_from_a_cache_and_explicit_geometry(cache_pairs, tiny_teacher):
    measured, _ = cache_pairs["inputs"]
    result = _cli("--depth", 2, "--heads", 4, "--embed-dim", 64, "--patch", 8, "--image-size", 32, "--layers", "all",
                  "--ratio-from", measured, "--images", 6, "--views", 2, "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["codecs"][0]
    assert row["codec"] == "inputs:bits=8"
    assert row["shard_bytes"] == pytest.approx(costs.measured_ratio(measured)["shard_bytes"])
    for bad in (["--depth", 2], ["--codec", "qk", "--ratio-from", measured], ["--codec", "lowrank:rank=99"],
                ["--ratio", 0.5, "--bits-per-element", 4]):
        failed = _cli(*bad)
        assert failed.exit_code == 2 and failed.stderr.startswith("error: "), failed.output


def test_unmeasured_codec_asks_for_a_ratio():
    with pytest.raises(costs.AttncacheError, match="`ratio`"):
        costs.plan(costs.PlanInputs(costs.timm_geometry("mae_vitb"), codecs=("sqrtq:bits=7",)))
    row = costs.plan(costs.PlanInputs(costs.timm_geometry("mae_vitb"), codecs=("sqrtq:bits=7",),
                                      bits_per_element=4))["codecs"][0]
    assert row["bits_per_element"] == pytest.approx(4) and row["ratio"] == pytest.approx(0.5)

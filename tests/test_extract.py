"""Extraction end to end: cached maps replay the live teacher, the manifest describes the cache, runs resume,
and bad input fails early with a message naming the culprit."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FOLDER_IMAGES, make_image_folder, reference_maps, render_sample
from safetensors.torch import load_file

from attncache import AttncacheError, open_cache
from attncache.extract import extract
from attncache.store import WRITERS
from attncache.teacher import TeacherOptions
from attncache.tools.verify import verify_cache
from attncache.views import ViewPolicy

extract_mod = importlib.import_module("attncache.extract")  # the module (the package re-exports the function)

# ---------------------------------------------------------------------------------------------------------------
# end to end: cache == live teacher on the stored views


def test_fp32_cache_replays_the_live_teacher(folder_fp32_zarr, tiny_teacher, image_folder):
    cache = open_cache(str(folder_fp32_zarr))
    assert len(cache) == 12 and cache.num_samples == 6 and cache.views_per_image == 2
    model = tiny_teacher.timm_model()  # built by timm directly from the weights file
    classes = sorted({c for c, *_ in FOLDER_IMAGES})
    xs, cached = [], []
    for cls, name, size, *_ in FOLDER_IMAGES:
        key = f"{cls}/{name}"
        for v in range(2):
            item = cache[key, v]
            assert (item.key, item.view_index, item.label) == (key, v, classes.index(cls))
            # the stored view is the one the documented policy draws for this key and size
            assert item.view == ViewPolicy(views_per_image=2, seed=0).draw(key, *size, 32)[v]
            xs.append(render_sample((image_folder / key).read_bytes(), item.view, cache.teacher))
            cached.append(item.maps)
    live = reference_maps(model, torch.stack(xs), [0, 1], "probs")
    torch.testing.assert_close(torch.stack(cached), live, rtol=0, atol=1e-6)


def test_fp16_cache_is_the_fp16_cast_of_the_fp32_cache(folder_fp32_zarr, folder_fp16_zarr):
    fp32, fp16 = open_cache(str(folder_fp32_zarr)), open_cache(str(folder_fp16_zarr))
    rows = list(range(len(fp32)))
    a, b = fp32.read_rows(rows), fp16.read_rows(rows)
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape == (12, 2, 4, 17, 17)
    assert torch.equal(b, a.half().float())
    assert not torch.equal(a, b)  # fp16 really rounds


def test_cache_item_access(folder_fp16_zarr):
    cache = open_cache(str(folder_fp16_zarr))
    assert torch.equal(cache["bee/b1.png"].maps, cache["bee/b1.png", 0].maps)
    row = cache.row("bee/b1.png", 1)
    assert row == 6 + 3  # view-major: view * num_samples + sample_index
    assert torch.equal(cache[row].maps, cache["bee/b1.png", 1].maps)
    both = cache.read_rows([row, 0])  # non-contiguous, unsorted
    assert torch.equal(both[0], cache[row].maps) and torch.equal(both[1], cache[0].maps)
    with pytest.raises(KeyError):
        cache["nope.png"]
    with pytest.raises(KeyError):
        cache["bee/b1.png", 2]
    with pytest.raises(IndexError):
        cache[12]


def test_registers_teacher_end_to_end(tmp_path, reg_teacher):
    """DINOv2 layout (5 prefix tokens) through extract -> open_cache, val split, logits payload."""
    out = tmp_path / "reg"
    m = extract(reg_teacher.config("demo:4", out, split="val", codec="fp32", payload="logits",
                                   records_per_shard=6))
    assert m["teacher"]["num_prefix_tokens"] == 5 and m["teacher"]["num_tokens"] == 9
    assert m["capture"]["map_shape"] == [2, 2, 9, 9] and m["capture"]["payload"] == "logits"
    assert m["views"]["split"] == "val" and m["views"]["crop_pct"] == m["teacher"]["crop_pct"]
    assert m["version"] == 5  # every cache is written as version 5 (record tables, chunk checksums, sealed manifest)
    cache = open_cache(str(out))
    assert len(cache) == 16 and len(m["store"]["shards"]) == 3
    from attncache.sources import open_source

    source = open_source("demo:4", split="val")  # the val demo images are drawn with their own seed
    keys = [cache.sample_at(i)["key"] for i in range(cache.num_samples)]
    xs = []
    for i, data in source.iter_bytes(range(16)):
        assert hashlib.sha256(data).hexdigest() == cache.sample_at(i)["sha256"]
        # val: timm's eval transform of each 48x48 image: resize to floor(28 / crop_pct), centre 28 x 28 crop
        scale = int(28 // m["teacher"]["crop_pct"])
        offset = float(round((scale - 28) / 2))
        assert cache.view(i).to_json() == {"flip": False, "resize": [scale, scale],
                                           "box": [offset, offset, offset + 28, offset + 28]}
        xs.append(render_sample(data, cache.view(i), cache.teacher))
    live = reference_maps(reg_teacher.timm_model(), torch.stack(xs), [0, 1], "logits")
    torch.testing.assert_close(cache.read_rows(list(range(16))), live, rtol=1e-5, atol=1e-5)
    assert keys[0] == "circle/0000.png" and cache[0].label == 0 and cache[15].label == 3


# ---------------------------------------------------------------------------------------------------------------
# manifest


def _sd_sha256(path: Path) -> str:
    """docs/format.md: for each tensor in name order, "{name}:{shape tuple}:{torch dtype};" then its raw bytes."""
    h = hashlib.sha256()
    for name, t in sorted(load_file(str(path)).items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_manifest_fields(folder_fp16_zarr, tiny_teacher, image_folder):
    m = json.loads((folder_fp16_zarr / "manifest.json").read_text())
    assert (m["format"], m["version"]) == ("attncache", 5)
    t = m["teacher"]
    assert t["model"] == "vit_tiny_patch16_224"
    assert (t["depth"], t["num_heads"], t["embed_dim"], t["patch_size"], t["image_size"]) == (2, 4, 64, 8, 32)
    assert (t["num_prefix_tokens"], t["num_tokens"]) == (1, 1 + (32 // 8) ** 2)
    assert t["model_args"] == tiny_teacher.args
    assert t["weights_source"] == f"file:{tiny_teacher.weights.name}"
    import timm

    cfg = timm.create_model("vit_tiny_patch16_224", pretrained=False).pretrained_cfg
    assert t["mean"] == list(cfg["mean"]) and t["std"] == list(cfg["std"])
    assert t["interpolation"] == cfg["interpolation"]
    assert t["weights_sha256"] == _sd_sha256(tiny_teacher.weights)

    assert m["capture"] == {"layers": [0, 1], "payload": "probs", "map_shape": [2, 4, 17, 17], "dtype": "float32"}
    assert m["codec"]["name"] == "fp16"
    assert m["codec"]["fields"] == {"maps": {"shape": [2, 4, 17, 17], "dtype": "float16"}}
    assert m["codec"]["compressor"] == {"id": "blosc", "cname": "zstd", "clevel": 1, "shuffle": 1,
                                        "blocksize": 1 << 20, "typesize": 2}
    assert m["views"] == {"split": "train", "views_per_image": 2, "seed": 0, "scale": [0.08, 1.0],
                          "ratio": [0.75, 4 / 3], "hflip": 0.5, "crop_pct": 0.875}

    # dataset: fingerprint over "{key}\t{sha256 of the file bytes}\n" in sample order (sorted classes, files)
    keys = sorted(f"{c}/{n}" for c, n, *_ in FOLDER_IMAGES)
    h = hashlib.sha256()
    for k in keys:
        h.update(f"{k}\t{hashlib.sha256((image_folder / k).read_bytes()).hexdigest()}\n".encode())
    d = m["dataset"]
    assert d["fingerprint"] == h.hexdigest() and d["num_samples"] == 6 and d["classes"] == ["ant", "bee", "cat"]
    cache = open_cache(str(folder_fp16_zarr))
    samples = [cache.sample_at(i) for i in range(cache.num_samples)]
    assert [s["key"] for s in samples] == keys
    assert [(s["width"], s["height"]) for s in samples] == [
        next(size for c, n, size, *_ in FOLDER_IMAGES if f"{c}/{n}" == k) for k in keys]

    s = m["store"]
    assert (s["format"], s["records"], s["records_per_shard"], s["embed_images"]) == ("zarr", 12, 5, False)
    assert [(x["index"], x["first_record"], x["records"]) for x in s["shards"]] == [(0, 0, 5), (1, 5, 5), (2, 10, 2)]
    entries = [f for x in s["shards"] for f in x["files"]] + s["metadata_files"] + list(m["files"].values())
    assert {f["path"] for f in s["metadata_files"]} == {"zarr.json", "maps/zarr.json"}
    for f in entries:
        data = (folder_fp16_zarr / f["path"]).read_bytes()
        assert f["bytes"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
    # every file of the cache (except resume state) is listed
    on_disk = {p.relative_to(folder_fp16_zarr).as_posix() for p in folder_fp16_zarr.rglob("*") if p.is_file()}
    assert {p for p in on_disk if not p.startswith(".progress/")} == {f["path"] for f in entries} | {"manifest.json"}


def test_weights_sha256_tracks_the_weights(tmp_path, tiny_teacher, other_tiny_teacher):
    m1 = extract(tiny_teacher.config("demo:1", tmp_path / "a", layers="0"))
    m2 = extract(other_tiny_teacher.config("demo:1", tmp_path / "b", layers="0"))
    assert m1["teacher"]["weights_sha256"] == _sd_sha256(tiny_teacher.weights)
    assert m2["teacher"]["weights_sha256"] == _sd_sha256(other_tiny_teacher.weights)
    assert m1["teacher"]["weights_sha256"] != m2["teacher"]["weights_sha256"]
    assert not torch.equal(open_cache(str(tmp_path / "a"))[0].maps, open_cache(str(tmp_path / "b"))[0].maps)


# ---------------------------------------------------------------------------------------------------------------
# resume


def _shard_files(out: Path, manifest_or_index) -> list[Path]:
    if isinstance(manifest_or_index, dict):
        return [out / f["path"] for s in manifest_or_index["store"]["shards"] for f in s["files"]]
    marker = json.loads((out / ".progress" / f"shard-{manifest_or_index:06d}.json").read_text())
    return [out / f["path"] for f in marker["files"]]


def _stat(paths):
    return [(p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in paths]


def _shard_sha(m: dict) -> list:
    return [[(f["path"], f["sha256"]) for f in s["files"]] for s in m["store"]["shards"]]


def _stray_partial(out: Path, fmt: str) -> Path:
    rel = "shards/.shard-000002.tar.k3j4h5.partial" if fmt == "wds" else "maps/c/2/0/0/0/0.0123abcd.partial"
    p = out / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"half a shard")
    return p


def _resume_config(teacher, out, fmt):
    # 16 demo images, 4 records per shard -> 4 shards; batches never straddle shards
    return teacher.config("demo:4", out, format=fmt, records_per_shard=4, embed_images=fmt == "wds")


@pytest.fixture(scope="module", params=["zarr", "wds"])
def uninterrupted(request, tmp_path_factory, tiny_teacher):
    out = tmp_path_factory.mktemp("full") / request.param
    return request.param, out, extract(_resume_config(tiny_teacher, out, request.param))


@pytest.mark.parametrize("how", ["write_shard", "on_shard"])
def test_interrupted_run_resumes_to_the_same_cache(uninterrupted, tmp_path, monkeypatch, tiny_teacher, how):
    fmt, full_out, full = uninterrupted
    out = tmp_path / "cache"
    cfg = _resume_config(tiny_teacher, out, fmt)
    if how == "write_shard":  # the writer dies on the 3rd shard
        calls = []
        original = WRITERS[fmt].write_shard

        def failing(self, index, *a, **kw):
            calls.append(index)
            if len(calls) == 3:
                raise OSError("disk full (test)")
            return original(self, index, *a, **kw)

        monkeypatch.setattr(WRITERS[fmt], "write_shard", failing)
        with pytest.raises(OSError, match="disk full"):
            extract(cfg)
        monkeypatch.undo()
    else:  # the callback after the 2nd durable shard interrupts the run

        def interrupt(index):
            if index == 1:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            extract(cfg, on_shard=interrupt)
    assert not (out / "manifest.json").exists()
    with pytest.raises(AttncacheError, match="not an attncache cache"):
        open_cache(str(out))
    done = sorted(p.name for p in (out / ".progress").glob("shard-*.json"))
    assert done == ["shard-000000.json", "shard-000001.json"]
    before = _stat(sorted(_shard_files(out, 0) + _shard_files(out, 1)))
    stray = _stray_partial(out, fmt)

    stats = {}
    resumed = extract(cfg, stats=stats)
    assert stats["records"] == 8  # only the two missing shards ran
    assert not (out / ".progress").exists()  # a finished cache carries no resume state
    shard_paths = {f["path"] for s in resumed["store"]["shards"][:2] for f in s["files"]}
    assert _stat(sorted(out / p for p in shard_paths)) == before  # complete shards untouched
    assert _shard_sha(resumed) == _shard_sha(full)
    assert resumed["files"] == full["files"]
    rows = list(range(16))
    assert torch.equal(open_cache(str(out)).read_rows(rows), open_cache(str(full_out)).read_rows(rows))
    assert not stray.exists()  # a finished cache holds only the files its format names
    verify_cache(str(out))


def test_corrupted_complete_shard_is_rewritten_on_resume(uninterrupted, tmp_path, tiny_teacher):
    fmt, full_out, full = uninterrupted
    out = tmp_path / "cache"
    cfg = _resume_config(tiny_teacher, out, fmt)

    def interrupt(index):
        if index == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(cfg, on_shard=interrupt)
    (victim,) = _shard_files(out, 1)
    good = victim.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF  # same size, marker kept
    victim.write_bytes(bytes(data))
    kept = _shard_files(out, 0) + _shard_files(out, 2)
    untouched = _stat(kept)

    stats = {}
    resumed = extract(cfg, stats=stats)
    assert stats["records"] == 8  # shard 1 (corrupt) and shard 3 (missing)
    assert victim.read_bytes() == good
    assert _stat(kept) == untouched
    assert _shard_sha(resumed) == _shard_sha(full)
    verify_cache(str(out))


def test_rerunning_a_finished_extraction_is_a_no_op(uninterrupted, tmp_path, tiny_teacher):
    fmt, _, _ = uninterrupted
    out = tmp_path / "cache"
    cfg = _resume_config(tiny_teacher, out, fmt)
    first = extract(cfg)
    files = sorted(p for p in out.rglob("*") if p.is_file() and ".progress" not in p.parts)
    before = _stat(files)
    stats = {}
    again = extract(cfg, stats=stats)
    assert again == first
    assert stats.get("records", 0) == 0
    assert sorted(p for p in out.rglob("*") if p.is_file() and ".progress" not in p.parts) == files
    assert _stat(files) == before


def test_rerun_repairs_a_corrupted_finished_cache(tmp_path, tiny_teacher):
    out = tmp_path / "cache"
    cfg = _resume_config(tiny_teacher, out, "wds")
    first = extract(cfg)
    victim = _shard_files(out, first)[3]
    good = victim.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(AttncacheError, match="shard-000003.tar"):
        verify_cache(str(out))
    stats = {}
    assert extract(cfg, stats=stats) == first and stats["records"] == 0  # a re-run checks sizes only: cheap
    assert victim.read_bytes() == bytes(data)
    again = extract(dataclasses.replace(cfg, repair=True), stats=stats)  # --repair re-hashes every file
    assert stats["records"] == 4  # one shard rewritten
    assert victim.read_bytes() == good and _shard_sha(again) == _shard_sha(first)
    verify_cache(str(out))


# ---------------------------------------------------------------------------------------------------------------
# bad input: a clear AttncacheError naming the culprit, before the teacher runs


def _forbid_teacher(monkeypatch):
    def forbidden(*a, **kw):
        raise AssertionError("the teacher ran before the bad input was detected")

    monkeypatch.setattr(extract_mod, "AttentionCapture", forbidden)


@pytest.fixture
def teacher_never_runs(monkeypatch):
    """Fails the test if extraction gets as far as running the teacher."""
    _forbid_teacher(monkeypatch)


def _tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(teacher=TeacherOptions("vit_nonexistent_patch3")), "unknown teacher 'vit_nonexistent_patch3'"),
        (dict(teacher=TeacherOptions("resnet18", pretrained=False)), "not a timm VisionTransformer"),
        (dict(teacher=TeacherOptions("vit_tiny_patch16_224", pretrained=False, image_size=30,
                                     args=dict(patch_size=8, depth=2, embed_dim=64, num_heads=4))), "30"),
        (dict(layers="0,7"), "`layers` '0,7'"),
        (dict(layers="first"), "`layers` 'first'"),
        (dict(codec="jpeg"), "unknown codec 'jpeg'"),
        (dict(codec_params={"shuffle": "sideways"}), "codec 'fp16'"),
        (dict(codec_params={"level": 3}), "codec 'fp16'"),
        (dict(embed_images=True), "`embed_images`"),
        (dict(payload="scores"), "`payload` 'scores'"),
        (dict(format="parquet"), "`format` 'parquet'"),
        (dict(views=0), "`views` 0"),
        (dict(split="val", views=2), "`split` val"),
        (dict(teacher=TeacherOptions("vit_tiny_patch16_224", pretrained=False, image_size=32, args={
            "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 4, "bogus_kw": 1})), "bogus_kw"),
    ],
)
def test_bad_options_fail_before_anything_is_written(tmp_path, tiny_teacher, image_folder, teacher_never_runs,
                                                     overrides, match):
    out = tmp_path / "out"
    with pytest.raises(AttncacheError, match=match):
        extract(tiny_teacher.config(image_folder, out, **overrides))
    assert not out.exists()


def test_missing_data_path(tmp_path, tiny_teacher, teacher_never_runs):
    missing = tmp_path / "no_such_images"
    with pytest.raises(AttncacheError, match=f"`data` {missing}"):
        extract(tiny_teacher.config(missing, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_corrupt_image_is_named_before_the_teacher_runs(tmp_path, tiny_teacher, teacher_never_runs):
    folder = make_image_folder(tmp_path / "imgs")
    good = (folder / "cat" / "c1.png").read_bytes()
    (folder / "cat" / "c1.png").write_bytes(good[: len(good) // 2])  # truncated PNG
    with pytest.raises(AttncacheError, match="cat/c1.png"):
        extract(tiny_teacher.config(folder, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_out_holding_a_different_cache_is_refused(tmp_path, tiny_teacher, other_tiny_teacher, monkeypatch):
    out = tmp_path / "out"
    extract(tiny_teacher.config("demo:1", out, layers="0"))
    _forbid_teacher(monkeypatch)
    before = _tree(out)
    cases = [
        (other_tiny_teacher.config("demo:1", out, layers="0"), "teacher"),
        (tiny_teacher.config("demo:1", out, layers="0", seed=1), "views"),
        (tiny_teacher.config("demo:1", out, layers="0", views=2), "views"),
        (tiny_teacher.config("demo:1", out, layers="all"), "capture"),
        (tiny_teacher.config("demo:1", out, layers="0", codec="fp32"), "codec"),
        (tiny_teacher.config("demo:2", out, layers="0"), "dataset"),
        (tiny_teacher.config("demo:1", out, layers="0", format="wds"), "store"),
    ]
    for cfg, match in cases:
        expected = rf"`out` {out}: holds a different cache \([a-z, ]*{match}[a-z, ]* differ"
        with pytest.raises(AttncacheError, match=expected):
            extract(cfg)
    assert _tree(out) == before


def test_out_not_empty_and_not_a_cache(tmp_path, tiny_teacher, teacher_never_runs):
    out = tmp_path / "homework"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(AttncacheError, match=f"`out` {out}: not empty and holds no attncache cache"):
        extract(tiny_teacher.config("demo:1", out))
    assert _tree(out) == {"thesis.tex": b"precious"}


def test_limit_and_flat_folder(tmp_path, tiny_teacher):
    """A flat folder has no labels (-1); --limit keeps the first N images."""
    flat = tmp_path / "flat"
    flat.mkdir()
    from conftest import image_bytes

    for i in range(3):
        (flat / f"{i}.png").write_bytes(image_bytes((20 + i, 24), seed=i))
    m = extract(tiny_teacher.config(flat, tmp_path / "out", limit=2, layers="0"))
    cache = open_cache(str(tmp_path / "out"))
    assert m["dataset"]["num_samples"] == 2 and m["dataset"]["classes"] == []
    assert [(s["key"], s["label"]) for s in map(cache.sample_at, range(2))] == [("0.png", -1), ("1.png", -1)]
    assert np.isfinite(cache.read_rows([0, 1]).numpy()).all()


def test_damaged_finished_cache_is_repaired_keeping_intact_shards(uninterrupted, tmp_path, tiny_teacher):
    fmt, full_out, full = uninterrupted
    out = tmp_path / "cache"
    cfg = _resume_config(tiny_teacher, out, fmt)
    first = extract(cfg)
    victim = out / first["store"]["shards"][1]["files"][0]["path"]
    good = victim.read_bytes()
    victim.write_bytes(good[:-7])  # a finished cache, one shard truncated after the fact
    kept = [out / f["path"] for i in (0, 2, 3) for f in first["store"]["shards"][i]["files"]]
    untouched = _stat(kept)

    stats = {}
    repaired = extract(cfg, stats=stats)
    assert stats["records"] == 4  # only the damaged shard ran again
    assert victim.read_bytes() == good and _stat(kept) == untouched
    assert _shard_sha(repaired) == _shard_sha(full)
    assert not (out / ".progress").exists()
    verify_cache(str(out))


# ---------------------------------------------------------------------------------------------------------------
# resume cost: what is left, not a full pass


def _count_reads(monkeypatch):
    from attncache.sources import DemoSource

    reads: list[int] = []
    original = DemoSource.read_index
    monkeypatch.setattr(DemoSource, "read_index", lambda self, i: reads.append(i) or original(self, i))
    hashed: list[str] = []
    record = extract_mod.plans.file_record
    monkeypatch.setattr(extract_mod.plans, "file_record", lambda out, rel: hashed.append(rel) or record(out, rel))
    return reads, hashed


def test_rerunning_a_finished_cache_reads_no_image_and_hashes_no_file(tmp_path, tiny_teacher, monkeypatch):
    """Regression: a re-run re-hashed the whole cache and decoded every image again (hours on ImageNet) before
    saying there was nothing to do. Now it lists the images, compares the plan and checks file sizes."""
    cfg = _resume_config(tiny_teacher, tmp_path / "cache", "zarr")
    first = extract(cfg)
    reads, hashed = _count_reads(monkeypatch)
    assert extract(cfg) == first
    assert reads == [] and hashed == []


def test_resuming_reads_only_the_images_of_unfinished_shards(tmp_path, tiny_teacher, monkeypatch):
    cfg = _resume_config(tiny_teacher, tmp_path / "cache", "wds")  # 16 images, 4 shards of 4 records (view-major)

    def interrupt(index):
        if index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(cfg, on_shard=interrupt)
    reads, hashed = _count_reads(monkeypatch)
    extract(cfg)
    assert sorted(reads) == list(range(8, 16))  # rows 8..15 = images 8..15: the scan re-read nothing
    assert sorted(hashed) == ["shards/shard-000002.tar", "shards/shard-000003.tar"]  # complete shards: by stat


def test_embedded_images_are_found_without_rescanning_the_shard(folder_fp16_wds, monkeypatch):
    """Regression: `read_images` scanned every member of a shard for each row it read."""
    import tarfile

    from attncache import open_cache

    opened = []
    original = tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda *a, **kw: opened.append(1) or original(*a, **kw))
    cache = open_cache(str(folder_fp16_wds))
    images = cache.reader.read_images(list(range(12)))
    assert len(opened) == 3  # one index per shard (3 shards), whatever the number of rows read
    assert [hashlib.sha256(b).hexdigest() for b in images] == [cache.sample(r)["sha256"] for r in range(12)]


def test_shard_compression_leaves_a_cpu_teacher_its_cores(monkeypatch, tiny_teacher, image_folder, tmp_path):
    """The writer compresses on the cores the teacher leaves free: a CPU teacher keeps its torch threads' cores
    (a pool beside them only slows it), an accelerator leaves every core but the render workers'. An extraction on
    a CPU whose cores the teacher fills compresses in the writer thread alone, and writes the same bytes."""
    import os

    from attncache.extract import pipeline
    from attncache.store import base

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 6)
    assert pipeline.writer_threads(torch.device("cpu"), 2) == 2
    assert pipeline.writer_threads(torch.device("cuda"), 2) == 5
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert pipeline.writer_threads(torch.device("cpu"), 2) == 1
    monkeypatch.undo()

    monkeypatch.setattr(base, "POOL_MIN_BYTES", 0)
    pooled = []
    real_pool = base.codec_pool
    monkeypatch.setattr(base, "codec_pool", lambda threads: pooled.append(threads) or real_pool(threads))
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: cores)  # the teacher fills every core
    extract(tiny_teacher.config(image_folder, tmp_path / "full", views=2, records_per_shard=5))
    assert pooled == []
    monkeypatch.setattr(torch, "get_num_threads", lambda: 0)  # as if every core were free (an accelerator)
    extract(tiny_teacher.config(image_folder, tmp_path / "free", views=2, records_per_shard=5))
    assert pooled and set(pooled) == {max(1, cores)} or cores < 2
    shards = [f["path"] for s in open_cache(str(tmp_path / "full")).manifest["store"]["shards"] for f in s["files"]]
    assert len(shards) == 3
    for rel in shards:
        assert (tmp_path / "full" / rel).read_bytes() == (tmp_path / "free" / rel).read_bytes()


def test_a_killed_scan_resumes_from_its_log(tmp_path, tiny_teacher, image_folder, monkeypatch):
    """Interrupted during the scan (before the claim): the re-run hashes only the images the log does not hold,
    and `--out` holding just the log is still free for it."""
    from attncache.extract import plan as plans
    from attncache.sources import base

    monkeypatch.setattr(plans, "SCAN_LOG_EVERY", 2)
    real_logger = plans.scan_logger

    def interrupting_logger(out):
        log = real_logger(out)

        def once(samples, stamps):
            log(samples, stamps)
            raise KeyboardInterrupt  # as Ctrl-C right after the first 2 images were logged

        return once

    monkeypatch.setattr(plans, "scan_logger", interrupting_logger)
    out = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        extract(tiny_teacher.config(image_folder, out))
    assert [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()] == [".progress/scan.jsonl"]
    assert len((out / ".progress/scan.jsonl").read_text().splitlines()) == 2
    monkeypatch.setattr(plans, "scan_logger", real_logger)
    hashed = []
    real_describe = base.describe_image
    monkeypatch.setattr(base, "describe_image",
                        lambda data, key, *a: hashed.append(key) or real_describe(data, key, *a))
    resumed = extract(tiny_teacher.config(image_folder, out))
    assert len(hashed) == 6 - 2
    straight = extract(tiny_teacher.config(image_folder, tmp_path / "straight"))
    assert resumed["dataset"] == straight["dataset"] and resumed["files"] == straight["files"]

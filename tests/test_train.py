"""Training from caches: parity with a live teacher, exact resume, workers, and every bad input the issue names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_image_folder
from safetensors.torch import load_file

from attncache.errors import AttncacheError
from attncache.eval import evaluate_run
from attncache.extract import extract
from attncache.teacher import TeacherOptions
from attncache.train import TrainConfig, train
from attncache.views import Augmentation


@pytest.fixture(scope="session")
def val_fp32(tmp_path_factory, tiny_teacher, image_folder) -> Path:
    out = tmp_path_factory.mktemp("caches") / "val_fp32"
    extract(tiny_teacher.config(image_folder, out, split="val", codec="fp32"))
    return out


@pytest.fixture(scope="session")
def logits_zarr(tmp_path_factory, tiny_teacher, image_folder) -> Path:
    out = tmp_path_factory.mktemp("caches") / "logits"
    extract(tiny_teacher.config(image_folder, out, views=2, codec="fp32", payload="logits"))
    return out


def config(tmp_path, name, mode, cache, data, **kw) -> TrainConfig:
    base = dict(mode=mode, out=str(tmp_path / name), cache=str(cache) if cache else None,
                data=str(data) if data else None, epochs=2, batch_size=2, workers=0, progress=False,
                log_every=1, lr=1e-3, warmup_epochs=0.5)
    return TrainConfig(**{**base, **kw})


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, atol: float = 0.0):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


# ---------------------------------------------------------------------------------------------------------------
# parity: an exact cache trains exactly like the live teacher


@pytest.mark.parametrize("mode", ["copy", "distill"])
def test_cache_parity_with_live_teacher(tmp_path, mode, tiny_teacher, image_folder, folder_fp32_zarr, val_fp32):
    common = dict(val_cache=str(val_fp32), val_data=str(image_folder), drop_path=0.1, layers="0-1")
    cached = config(tmp_path, "cached", mode, folder_fp32_zarr, image_folder, **common)
    live = config(tmp_path, "live", mode, folder_fp32_zarr, image_folder, teacher=tiny_teacher.options(),
                  **common)
    r_cached, r_live = train(cached), train(live)
    assert r_cached["steps"] == r_live["steps"] == 6  # 6 images, batch 2, 2 epochs
    a, b = losses(tmp_path / "cached"), losses(tmp_path / "live")
    assert len(a) == 6 and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-6
    assert a[0] != a[-1]  # it did train
    assert_same_weights(tmp_path / "cached", tmp_path / "live", atol=1e-6)
    assert r_cached["val_top1"] == r_live["val_top1"]


def test_fp16_cache_trains_close_to_exact(tmp_path, monkeypatch, image_folder, folder_fp16_zarr, folder_fp32_zarr):
    """Regression (the old test, at 1e-2, passed with uniform maps): distillation from fp16 maps follows the fp32
    run step for step, and the same run with every decoded map replaced by the uniform distribution falls outside
    the tolerance. The tiny random teacher's maps are close to uniform, so the tolerance sits between the measured
    gaps: fp16 7e-5, uniform 1.3e-3 (all-zero maps: 8.5)."""
    from attncache.cache import Cache

    a = train(config(tmp_path, "fp16", "distill", folder_fp16_zarr, image_folder))
    b = train(config(tmp_path, "fp32", "distill", folder_fp32_zarr, image_folder))
    decode = Cache.decode
    monkeypatch.setattr(Cache, "decode", lambda self, fields, device="cpu":
                        torch.full_like(m := decode(self, fields, device), 1 / m.shape[-1]))
    c = train(config(tmp_path, "uniform", "distill", folder_fp16_zarr, image_folder))
    assert a["steps"] == b["steps"] == c["steps"] == 6
    exact = losses(tmp_path / "fp32")
    gap = max(abs(x - y) for x, y in zip(losses(tmp_path / "fp16"), exact, strict=True))
    sabotage = max(abs(x - y) for x, y in zip(losses(tmp_path / "uniform"), exact, strict=True))
    assert gap < 3e-4 < sabotage, (gap, sabotage)


# ---------------------------------------------------------------------------------------------------------------
# resume, workers, finished runs


def test_interrupted_run_resumes_to_identical_weights(tmp_path, image_folder, folder_fp32_zarr, val_fp32):
    kw = dict(val_cache=str(val_fp32), val_data=str(image_folder), ema=0.9, drop_path=0.2)
    straight = train(config(tmp_path, "straight", "copy", folder_fp32_zarr, image_folder, **kw))
    stopped = train(config(tmp_path, "resumed", "copy", folder_fp32_zarr, image_folder, max_steps=4, **kw))
    assert stopped == {"stopped_at_step": 4, "epoch": 1}  # mid-epoch 2 (3 steps per epoch)
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    resumed = train(config(tmp_path, "resumed", "copy", folder_fp32_zarr, image_folder, **kw))
    assert resumed == straight
    assert_same_weights(tmp_path / "straight", tmp_path / "resumed")
    for name in ("ema.safetensors",):
        ea, eb = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "resumed" / name))
        assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")  # metrics not duplicated either
    # a finished run is a no-op that returns its results
    assert train(config(tmp_path, "resumed", "copy", folder_fp32_zarr, image_folder, **kw)) == straight


def test_other_run_in_out_is_refused(tmp_path, image_folder, folder_fp32_zarr):
    train(config(tmp_path, "run", "distill", folder_fp32_zarr, image_folder, epochs=1))
    with pytest.raises(AttncacheError, match=r"a different training run \(options \['lr'\] differs\)"):
        train(config(tmp_path, "run", "distill", folder_fp32_zarr, image_folder, epochs=1, lr=0.1))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(AttncacheError, match="not empty"):
        train(config(tmp_path, "junk", "distill", folder_fp32_zarr, image_folder))
    assert (tmp_path / "junk" / "notes.txt").read_text() == "mine"


def test_worker_processes_give_the_same_run(tmp_path, image_folder, folder_fp16_zarr, folder_fp16_wds):
    """zarr: the batch order does not depend on the number of workers (forkserver workers, cache opened inside)."""
    train(config(tmp_path, "w0", "distill", folder_fp16_zarr, image_folder, workers=0))
    train(config(tmp_path, "w2", "distill", folder_fp16_zarr, image_folder, workers=2))
    assert_same_weights(tmp_path / "w0", tmp_path / "w2")
    # webdataset cache with embedded images: no --data needed, streamed by shard through workers
    r = train(config(tmp_path, "wds", "copy", folder_fp16_wds, None, workers=2, val_cache=str(folder_fp16_wds)))
    assert 4 <= r["steps"] <= 6 and r["val_images"] == 6  # each worker drops its own incomplete last batch


# ---------------------------------------------------------------------------------------------------------------
# the other modes


def test_gta_from_logits_cache(tmp_path, tiny_teacher, image_folder, logits_zarr, other_tiny_teacher):
    r = train(config(tmp_path, "gta", "gta", logits_zarr, image_folder,
                     teacher=TeacherOptions(weights=str(tiny_teacher.weights)), val_data=str(image_folder)))
    assert r["layers"] == [0, 1] and r["steps"] == 6
    first = [json.loads(x) for x in (tmp_path / "gta" / "metrics.jsonl").read_text().splitlines()][0]
    # step 1 starts from the teacher's own weights: its [CLS] logits equal the cached ones, penalty ~0
    assert first["transfer"] < 1e-8
    with pytest.raises(AttncacheError, match="not the weights that made the maps"):
        train(config(tmp_path, "gta2", "gta", logits_zarr, image_folder,
                     teacher=TeacherOptions(weights=str(other_tiny_teacher.weights))))


def test_baselines_with_live_views(tmp_path, tiny_teacher, image_folder):
    """scratch / finetune need no cache: views drawn live from --data, the architecture from --teacher."""
    kw = dict(teacher=tiny_teacher.options(), val_data=str(image_folder))
    scratch = train(config(tmp_path, "scratch", "scratch", None, image_folder, **kw))
    finetune = train(config(tmp_path, "ft", "finetune", None, image_folder, **kw))
    assert scratch["steps"] == finetune["steps"] == 6 and scratch["val_images"] == 6
    student, teacher = weights(tmp_path / "ft"), load_file(str(tiny_teacher.weights))
    assert not torch.equal(student["blocks.0.attn.qkv.weight"], teacher["blocks.0.attn.qkv.weight"])  # trained
    # distill with a live teacher and live views (no cache anywhere)
    assert train(config(tmp_path, "live", "distill", None, image_folder, **kw))["steps"] == 6


def test_eval_and_ensemble(tmp_path, tiny_teacher, image_folder, folder_fp32_zarr, val_fp32):
    """`attncache eval` top-1 and the ensemble's, against the same numbers computed without attncache: timm
    models loaded from the runs' safetensors, on the val cache's views rendered by hand."""
    import timm
    from conftest import render_sample

    from attncache import open_cache

    common = dict(val_cache=str(val_fp32), val_data=str(image_folder), epochs=3, lr=3e-3)
    copy = train(config(tmp_path, "copy", "copy", folder_fp32_zarr, image_folder, **common))
    train(config(tmp_path, "scratch", "scratch", folder_fp32_zarr, image_folder, **common))
    train(config(tmp_path, "ft", "finetune", folder_fp32_zarr, image_folder,
                 teacher=TeacherOptions(weights=str(tiny_teacher.weights)), **common))
    assert evaluate_run(str(tmp_path / "copy"))["student_top1"] == copy["val_top1"]
    result = evaluate_run(str(tmp_path / "scratch"), ensemble_with=str(tmp_path / "ft"))

    cache = open_cache(str(val_fp32))
    samples = [cache.sample_at(i) for i in range(cache.num_samples)]
    x = torch.stack([render_sample((image_folder / s["key"]).read_bytes(), cache.view(i), cache.teacher)
                     for i, s in enumerate(samples)])
    labels = torch.tensor([s["label"] for s in samples])
    probs = {}
    for name in ("scratch", "ft"):
        model = timm.create_model(tiny_teacher.name, num_classes=3, img_size=32, **tiny_teacher.args).eval()
        model.load_state_dict(weights(tmp_path / name))
        with torch.no_grad():
            probs[name] = model(x).softmax(-1)

    def top1(p):
        return 100.0 * (p.argmax(-1) == labels).float().mean().item()

    assert result["student_top1"] == pytest.approx(top1(probs["scratch"]), abs=1e-9)
    assert result["finetuned_top1"] == pytest.approx(top1(probs["ft"]), abs=1e-9)
    assert result["ensemble_top1"] == pytest.approx(top1((probs["scratch"] + probs["ft"]) / 2), abs=1e-9)
    nll = -((probs["scratch"] + probs["ft"]) / 2).log().gather(1, labels[:, None]).mean().item()
    assert result["ensemble_loss"] == pytest.approx(nll, rel=1e-5)
    assert result["student_images"] == result["ensemble_images"] == 6
    with pytest.raises(AttncacheError, match="needs the teacher's maps"):
        _eval_without_cache(tmp_path / "copy", image_folder)


def _eval_without_cache(run: Path, data: Path):
    cfg = json.loads((run / "config.json").read_text())
    cfg["options"]["val_cache"] = None
    (run / "config.json").write_text(json.dumps(cfg))
    return evaluate_run(str(run), val_data=str(data))


# ---------------------------------------------------------------------------------------------------------------
# bad input: clear errors before training starts


def test_bad_inputs(tmp_path, tiny_teacher, reg_teacher, image_folder, folder_fp32_zarr, val_fp32, logits_zarr):
    def fails(match, **kw):
        mode = kw.pop("mode", "copy")
        cache = kw.pop("cache", folder_fp32_zarr)
        data = kw.pop("data", image_folder)
        kw.setdefault("val_cache", str(val_fp32))
        kw.setdefault("val_data", str(image_folder))
        with pytest.raises(AttncacheError, match=match):
            train(config(tmp_path, "bad", mode, cache, data, **kw))
        assert not (tmp_path / "bad" / "checkpoints").exists()

    fails("have different teacher geometry", teacher=reg_teacher.options())
    one_layer = tmp_path / "layer1"
    extract(tiny_teacher.config(image_folder, one_layer, layers="1", codec="fp32"))
    fails(r"holds layers \[1\], `mode` copy needs \[0\]", cache=one_layer)
    fails(r"layer indices must lie in 0..1", mode="distill", layers="0-2")
    fails("copy mode evaluates with the teacher.s maps", val_cache=None)
    fails("regularises attention logits", mode="gta", teacher=TeacherOptions(weights=str(tiny_teacher.weights)))
    fails("other augmentation: mixup 0.0 \\(asked: 0.8\\)", augment=Augmentation(mixup=0.8))
    fails("`layer_decay` 1.5", layer_decay=1.5)
    fails("needs teacher maps: pass `cache`", cache=None)
    fails("num_heads 2 vs 4", student=tiny_teacher.name, student_args={**tiny_teacher.args, "num_heads": 2})
    # arguments that would be lost without a word: timm drops None kwargs (init_values=None keeps LayerScale on),
    # and without `student` the student is the teacher's architecture with the teacher's args
    fails(r"`student_args` \['depth'\] without `student`", student_args={"depth": 1})
    fails("`student_args` init_values=None: timm drops arguments set to None", student=tiny_teacher.name,
          student_args={**tiny_teacher.args, "init_values": None})
    fails("does not embed images: pass `data`", data=None)
    # a val source's errors name the option that gave it, not `data`
    fails("`val_data` /nonexistent: no such file or directory", mode="distill", val_cache=None, val_data="/nonexistent")
    # an image missing for a cached key, and an image that changed since extraction
    broken = make_image_folder(tmp_path / "broken")
    (broken / "bee" / "b1.png").unlink()
    fails(r"cached image\(s\) not found, e.g. 'bee/b1.png'", data=broken)
    changed = make_image_folder(tmp_path / "changed")
    (changed / "cat" / "c1.png").write_bytes((changed / "cat" / "c0.jpg").read_bytes())
    fails(r"changed/cat/c1.png: differs from the image `cache` .* \(sha256 mismatch\): wrong `data`\?", data=changed)


def test_cache_keys_cannot_escape_the_data_folder(image_folder):
    from attncache.sources import FolderSource

    source = FolderSource(image_folder)
    for key in ("../secret.png", "/etc/passwd", "ant/../../x.png"):
        with pytest.raises(AttncacheError, match="not a relative path inside"):
            source.read_key(key)


def test_gta_from_a_cls_rows_cache(tmp_path, tiny_teacher, image_folder, logits_zarr):
    """A cache of [CLS]-query logit rows only (codec `cls`) is all GTA needs; copy refuses it."""
    cls_cache = tmp_path / "cls"
    extract(tiny_teacher.config(image_folder, cls_cache, views=2, payload="logits", codec="cls"))
    from attncache import open_cache

    full, rows = open_cache(str(logits_zarr)), open_cache(str(cls_cache))
    assert rows.read_rows([0, 7]).shape == (2, 2, 4, 1, 17)
    torch.testing.assert_close(rows.read_rows([0, 7]), full.read_rows([0, 7])[:, :, :, :1].half().float())
    assert rows.summary()["shard_bytes"] < full.summary()["shard_bytes"] / 8
    kw = dict(teacher=TeacherOptions(weights=str(tiny_teacher.weights)))
    a = train(config(tmp_path, "gta_cls", "gta", cls_cache, image_folder, **kw))
    b = train(config(tmp_path, "gta_full", "gta", logits_zarr, image_folder, **kw))
    assert a["steps"] == b["steps"]
    assert max(abs(x - y) for x, y in zip(losses(tmp_path / "gta_cls"), losses(tmp_path / "gta_full"),
                                         strict=True)) < 1e-3  # fp16 rows vs fp32 maps
    with pytest.raises(AttncacheError, match="keeps only \\[CLS\\]-query rows; `mode` copy needs whole maps"):
        train(config(tmp_path, "copy_cls", "copy", cls_cache, image_folder, val_cache=str(cls_cache),
                     val_data=str(image_folder)))


# ---------------------------------------------------------------------------------------------------------------
# regressions from the foundation review


def test_a_failed_run_never_blocks_the_corrected_command(tmp_path, image_folder, folder_fp32_zarr, val_fp32,
                                                         monkeypatch):
    """Regression: an image's sha256 mismatch was found after config.json was written, and re-running with the
    right --data was refused ("holds another training run"). Now (a) a spread of images is hashed before the run
    directory is claimed, and (b) a mismatch found later, before any checkpoint, leaves a run that the corrected
    command re-claims: it ends as a clean run does."""
    import attncache.train.loader as loader

    wrong = make_image_folder(tmp_path / "wrong")
    (wrong / "cat" / "c1.png").write_bytes((wrong / "cat" / "c0.jpg").read_bytes())
    kw = dict(val_cache=str(val_fp32), val_data=str(image_folder))
    with pytest.raises(AttncacheError, match=r"wrong/cat/c1.png: differs from the image `cache`"):
        train(config(tmp_path, "run", "copy", folder_fp32_zarr, wrong, **kw))
    assert not (tmp_path / "run").exists()  # (a): nothing claimed

    monkeypatch.setattr(loader, "SPOT_CHECKS", 1)  # as on a large dataset: the bad image is not spot-checked
    with pytest.raises(AttncacheError, match=r"wrong/cat/c1.png differs from the one the cache was extracted"):
        train(config(tmp_path, "run", "copy", folder_fp32_zarr, wrong, **kw))
    assert (tmp_path / "run" / "config.json").exists() and not (tmp_path / "run" / "checkpoints").exists()
    fixed = train(config(tmp_path, "run", "copy", folder_fp32_zarr, image_folder, **kw))  # (b): re-claimed
    clean = train(config(tmp_path, "clean", "copy", folder_fp32_zarr, image_folder, **kw))
    assert fixed == clean
    assert_same_weights(tmp_path / "run", tmp_path / "clean")


def test_finetune_without_weights_fails_at_once(tmp_path, tiny_teacher, image_folder, folder_fp32_zarr):
    """Regression: `--mode finetune --no-pretrained` ignored --no-pretrained and spent 52 s on hub retries."""
    import time

    start = time.perf_counter()
    with pytest.raises(AttncacheError, match=r"`mode` finetune starts from the teacher's weights: pass "
                                             r"`teacher\.weights`"):
        train(config(tmp_path, "ft", "finetune", folder_fp32_zarr, image_folder,
                     teacher=TeacherOptions(pretrained=False)))
    assert time.perf_counter() - start < 2 and not (tmp_path / "ft").exists()


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_honour_the_umask(tmp_path, tiny_teacher, image_folder, umask):
    """Regression: manifest.json, the index files (and checkpoints) were written 0600, so a cache
    meant for sharing was unreadable by the group. Every file gets 0666 minus the umask, as any file a user
    creates."""
    import os

    import attncache.files as files

    monkey_umask = os.umask(umask)
    files._umask = None  # read again
    try:
        cache = tmp_path / "cache"
        extract(tiny_teacher.config(image_folder, cache, layers="0", records_per_shard=5, format="wds"))
        run = tmp_path / "run"
        train(config(tmp_path, "run", "distill", cache, image_folder, max_steps=2, save_every=1))
        train(config(tmp_path, "run", "distill", cache, image_folder))
    finally:
        os.umask(monkey_umask)
        files._umask = None
    paths = [p for root in (cache, run) for p in root.rglob("*") if p.is_file()]
    assert {p.name for p in paths} >= {"manifest.json", "samples.bin", "views.bin", "shard-000000.tar",
                                       "config.json", "metrics.jsonl", "last.pt", "model.safetensors",
                                       "results.json"}
    for p in paths:
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p

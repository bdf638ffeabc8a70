"""`make demo`: the main job end to end on the embedded demo set, offline, in a few minutes on a CPU.

1. teacher: a tiny ViT trained briefly on 512 procedurally drawn shape images (so its attention means something);
2. extract: its maps over a smaller, separate train set (zarr, 2 views per image) and a val set (webdataset, images
   embedded), then inspect and verify both caches and replay one cached view through the live teacher;
3. train: `scratch`, `copy` and `distill` students on the small train set, from the cache alone; then `copy` and
   `distill` with the reference recipes (`at-copy`, `at-distill`: RandAugment, erasing, mixup/cutmix views and
   teacher drop-path masks from caches extracted with the recipe, layer decay, EMA, ...), at the demo's epochs,
   batch and lr;
4. print a results table, and draw the teacher's and the distilled student's attention on a val view (PNG).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..cache import open_cache
from ..extract import ExtractConfig, extract
from ..recipes import extract_config, train_config
from ..sources import open_image, open_source
from ..teacher import AttentionCapture, TeacherOptions
from ..train import TrainConfig, train
from ..views import render
from .verify import verify_cache
from .viz import visualize

STUDENT_MODES = ("scratch", "copy", "distill")
RECIPES = ("at-copy", "at-distill")


def run_demo(out: str | Path, epochs: int = 30) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}

    _say("1/4 teacher: tiny ViT (4 layers, 4 heads, 32 px) trained on demo:128 (512 images)")
    teacher_run = train(TrainConfig(mode="scratch", out=str(out / "teacher_run"),
                                    teacher=TeacherOptions("demo", pretrained=False), data="demo:128",
                                    val_data="demo:25", epochs=epochs, batch_size=32, lr=2e-3,
                                    warmup_epochs=2, workers=0, progress=False))
    weights = out / "teacher_run" / "model.safetensors"
    results["teacher_val_top1"] = teacher_run["val_top1"]

    _say("2/4 extract: train cache (zarr, 64 images x 2 views), the same with each reference recipe's augmented and "
         "mixed views, val cache (wds, 100 images, embedded)")
    common = dict(teacher=TeacherOptions("demo", weights=str(weights)), batch_size=32, layers="all", progress=False)
    extract(ExtractConfig(**common, data="demo", out=str(out / "train_cache"), views=2))
    for recipe in RECIPES:  # at-distill's views also carry the teacher's drop-path masks
        extract(extract_config(recipe, **common, data="demo", out=str(out / f"cache_{recipe}"), views=2))
    extract(ExtractConfig(**common, data="demo:25", out=str(out / "val_cache"), split="val", format="wds",
                          embed_images=True))
    for name in ("train_cache", *(f"cache_{r}" for r in RECIPES), "val_cache"):
        verify_cache(str(out / name))
        results[name] = open_cache(str(out / name)).summary()
        s = results[name]
        print(f"  {name}: {s['records']} records, {s['shards']} shard(s), layers {s['layers']}, "
              f"{s['shard_bytes_per_view']:,.0f} bytes/view, codec {s['codec']}, store {s['store']} (verify: ok)")
    results["replay_max_abs_error"] = _replay(out, weights)

    _say(f"3/4 train students for {epochs} epochs from the cache alone (no live teacher)")
    rows = []
    for mode in STUDENT_MODES:
        start = time.perf_counter()
        r = train(TrainConfig(mode=mode, out=str(out / f"student_{mode}"), cache=str(out / "train_cache"),
                              data="demo", val_cache=str(out / "val_cache"), layers="all", epochs=epochs,
                              batch_size=16, lr=1e-3, warmup_epochs=2, workers=0, progress=False))
        rows.append((mode, r["val_top1"], r["steps"], time.perf_counter() - start))
        results[f"student_{mode}_val_top1"] = r["val_top1"]
    for recipe in RECIPES:  # the recipe's views and regularisation, at the demo's scale of epochs, batch and lr
        start = time.perf_counter()
        r = train(train_config(recipe, out=str(out / f"student_{recipe}"), cache=str(out / f"cache_{recipe}"),
                               data="demo", val_cache=str(out / "val_cache"), layers="all", epochs=epochs,
                               batch_size=16, lr=1e-3, warmup_epochs=2, workers=0, progress=False))
        rows.append((f"{r['mode']} (--recipe {recipe})", r["val_top1"], r["steps"], time.perf_counter() - start))
        results[f"student_{recipe}_val_top1"] = r["val_top1"]

    _say("4/4 results (val: 100 images, 4 classes)")
    _table(rows, results["teacher_val_top1"])
    picture = visualize(out / "attention.png", cache=str(out / "val_cache"), checkpoint=str(out / "student_distill"))
    results["attention_png"] = str(picture)
    print(f"  where the teacher and the distilled student look ([CLS] row, every layer and head): {picture}")
    (out / "demo_results.json").write_text(json.dumps(results, indent=2))
    assert results["replay_max_abs_error"] < 1e-3
    return results


def _replay(out: Path, weights: Path) -> float:
    """The promise of a cache: a stored view replayed with render() gives the live teacher's maps."""
    model, _ = TeacherOptions("demo", weights=str(weights)).build()
    cache = open_cache(str(out / "train_cache"))
    item = cache["triangle/0003.png", 1]
    data = open_source("demo").read_key(item.key)
    t = cache.teacher
    x = render(open_image(data, item.key), item.view, t.image_size, t.interpolation, t.mean, t.std)
    with AttentionCapture(model, cache.layers, cache.decodes_to) as capture:
        live = capture(x[None])[0]
    err = (live - item.maps).abs().max().item()
    print(f"  replay of {item.key} view 1 {item.view.to_json()}: max |cached - live teacher| = {err:.2e} (fp16)")
    return err


def _table(rows, teacher_top1: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=True)
    for col in ("student", "val top-1 %", "steps", "seconds"):
        table.add_column(col, justify="left" if col == "student" else "right")
    for mode, top1, steps, seconds in rows:
        table.add_row(mode, f"{top1:.1f}", str(steps), f"{seconds:.1f}")
    table.add_row("(teacher, trained on 8x the data)", f"{teacher_top1:.1f}", "", "")
    Console().print(table)


def _say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)

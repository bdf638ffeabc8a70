#!/usr/bin/env python
"""Scale benchmark (issue 22): what opening, reading and training from a cache cost as the record count grows.

One command per table row. For N records (N/4 images x 4 views) it builds, once per --work directory:

- a real image source as users hold them: webdataset tar shards (default; 1,000 images per tar, each a distinct
  16x16 PNG with a `.cls` label over 1,000 classes, encoded in memory) or an ImageFolder of the same images
  (`--source folder`), so the source's own index is part of what is measured;
- a real cache of N records written by `attncache.extract.extract` with a micro timm ViT at ViT-L depth (24
  blocks, width 16, 2 heads, patch 8, 16 px images: 5 tokens; random init, no download), one captured layer with
  the `fp16` codec (tiny maps) and the `at-distill` recipe's views: RandAugment ops, random erasing, mixup/cutmix
  partners and the teacher's 24 drop-path masks per view; zarr (default) or `--format wds`.

Then it measures, each in a fresh subprocess (imports and the interpreter's own state comparable between rows;
the cache's and the source's files are read once just before, so their pages are warm in the page cache):

1. open: `import attncache` (timed apart), then a first `open_cache(path)` (which also imports what opening needs
   lazily: timm for a RandAugment policy, jsonschema, ...), then a second `open_cache(path)` (imports warm: the
   reported open time), then that cache's first record, `cache.view(0)` and `cache.sample(0)`, each timed apart;
2. random rows: mean (and p99) of `cache.view(r)` + `cache.sample(r)` over `--rows` random rows, after the first
   touch; the process's RSS after it;
3. epoch plan: `ViewStream(...).plan(0)` as the trainer builds the stream, in the zarr order (a permutation) and
   the wds order (shards shuffled, rows through a shuffle buffer; for a zarr cache by setting the opened
   manifest's store format to "wds" in memory: the plan reads nothing else of the store);
4. train: `attncache.train.train(TrainConfig)` from the `at-distill` recipe, distilling the cached layer, with
   `--workers` loader workers and `--steps` steps: seconds from the train() call to the first optimizer step
   (a torch optimizer step hook), and the peak PSS of the whole process tree (the training process, forkserver
   and workers: /proc/<pid>/smaps_rollup Pss summed over every descendant, sampled every 0.2 s, or less often
   where reading smaps_rollup would take more than 10 % of a core; the loader workers are checked to import the
   same attncache as the training process);
5. extraction (when the cache is built): wall time, peak RSS of the extraction process, its RSS growth per record
   ((peak - RSS before extract(), with timm imported and a teacher built) / N), the time and RSS before the
   pipeline starts (scan, views drawn, index files) and the slope of RSS over the records written (at each
   finished shard). One render thread by default (`--extract-workers`): the scan shares it, and a webdataset
   source's scan on 2 threads reads wrong bytes (its shard files are shared between threads).

Each row is printed as a markdown table row and appended as a JSON line to --results. Only the public API is
used, so the same script measures any version of attncache (run it with PYTHONPATH=<checkout> to measure another):

    python benchmarks/scale.py --records 50000 --work /work/bench_scale --label before
    python benchmarks/scale.py --table /work/bench_scale/results.jsonl       # every row so far, and slopes
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

VIEWS = 4
TEACHER = dict(name="vit_tiny_patch16_224", image_size=16,
               args=dict(patch_size=8, depth=24, embed_dim=16, num_heads=2))  # ViT-L depth, micro width
LAYERS = "0"
CODEC = "fp16"
RECIPE = "at-distill"
CLASSES = 1000
IMAGE_SIDE = 16

# ---------------------------------------------------------------------------------------------------------------
# the source


def image_png(index: int) -> bytes:
    """A distinct 16x16 RGB PNG: a gradient whose colours depend on the index, with the index in the first pixels."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:IMAGE_SIDE, 0:IMAGE_SIDE]
    a, b, c = index % 251, (index // 251) % 241, (index // 60491) % 239
    pixels = np.stack([(xx * 13 + a) % 256, (yy * 11 + b) % 256, ((xx + yy) * 7 + c) % 256], -1).astype(np.uint8)
    pixels[0, :4, :] = np.frombuffer(index.to_bytes(12, "little"), np.uint8).reshape(4, 3)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def key_of(index: int) -> str:
    return f"n{index % CLASSES:08d}_{index:08d}"  # ImageNet-like length (18 characters)


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o644
    tar.addfile(info, io.BytesIO(data))


def build_source(root: Path, images: int, kind: str, per_shard: int) -> dict:
    """The images once; a finished source (marker file) is reused. Returns its description."""
    marker = root / "source.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info["images"] == images and info["kind"] == kind:
            return info
        raise SystemExit(f"{root}: holds another source ({info}); use another --work")
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if kind == "wds":
        shards = -(-images // per_shard)
        for s in range(shards):
            path = root / f"shard-{s:05d}.tar"
            if path.is_file():
                continue  # written whole (renamed) by an earlier, interrupted run
            tmp = path.with_suffix(".tar.tmp")
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                for i in range(s * per_shard, min(images, (s + 1) * per_shard)):
                    _add(tar, f"{key_of(i)}.png", image_png(i), 1_700_000_000)
                    _add(tar, f"{key_of(i)}.cls", str(i % CLASSES).encode(), 1_700_000_000)
            tmp.rename(path)
        data = str(root / f"shard-{{00000..{shards - 1:05d}}}.tar") if shards > 1 else str(root / "shard-00000.tar")
    else:
        data = str(root / "images")
        for i in range(images):
            folder = root / "images" / f"c{i % CLASSES:04d}"
            path = folder / f"{key_of(i)}.png"
            if not path.is_file():
                folder.mkdir(parents=True, exist_ok=True)
                path.write_bytes(image_png(i))
        shards = 0
    info = {"images": images, "kind": kind, "data": data, "shards": shards, "build_s": time.perf_counter() - start}
    marker.write_text(json.dumps(info))
    return info


def warm(paths: list[Path]) -> float:
    """Read every file under `paths` once (their pages are then warm); returns the bytes read in MB."""
    total = 0
    for p in paths:
        for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())):
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    total += len(chunk)
    return total / 1e6


# ---------------------------------------------------------------------------------------------------------------
# memory of processes (/proc, Linux)


def _status_kb(pid: int | str, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_mb(pid: int | str = "self") -> float:
    return _status_kb(pid, "VmRSS") / 1024


def pss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # exited meanwhile
        pass
    return 0.0


def descendants(root: int) -> list[int]:
    """`root` and every process below it (forkserver, DataLoader workers, resource tracker)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, []))
    return out


class Sampler(threading.Thread):
    """Samples a figure every `interval` s in the background and keeps the peak. Reading smaps_rollup walks a
    process's mappings (~15 ms for a process that imported torch, more as it grows): the wait stretches so that
    sampling takes at most `duty` of one core, or on 2 cores it would slow what it measures."""

    def __init__(self, measure, interval: float = 0.2, duty: float = 0.1):
        super().__init__(daemon=True)
        self.measure, self.interval, self.duty = measure, interval, duty
        self.peak, self.peak_detail, self.samples, self.cpu_s = 0.0, None, 0, 0.0
        self.started = self.finished = 0.0
        self._halt = threading.Event()

    def sample(self):
        value, detail = self.measure()
        self.samples += 1
        if value > self.peak:
            self.peak, self.peak_detail = value, detail
        return value

    def run(self):
        self.started = time.perf_counter()
        while not self._halt.is_set():
            cpu = time.thread_time()
            self.sample()
            cost = time.thread_time() - cpu
            self._halt.wait(max(self.interval, cost * (1 / self.duty - 1)))
        self.cpu_s = time.thread_time()  # what sampling cost this process
        self.finished = time.perf_counter()

    @property
    def mean_interval(self) -> float:
        return (self.finished - self.started) / max(1, self.samples - 1)

    def stop(self):
        self._halt.set()
        self.join()
        self.sample()


class TreePss:
    """PSS of this process and every descendant; remembers when the tree first held `expect` processes."""

    def __init__(self, expect: int):
        self.expect, self.t0, self.full_at = expect, None, None

    def __call__(self) -> tuple[float, dict]:
        pids = descendants(os.getpid())
        values = {pid: pss_mb(pid) for pid in pids}
        alive = sum(1 for v in values.values() if v > 0)
        if self.full_at is None and self.t0 is not None and alive >= self.expect:
            self.full_at = time.perf_counter() - self.t0
        return sum(values.values()), {"processes": alive, "main_mb": values.get(os.getpid(), 0.0),
                                      "each_mb": sorted((round(v) for v in values.values() if v > 0), reverse=True)}


# ---------------------------------------------------------------------------------------------------------------
# the measurements (each runs in a fresh process: `scale.py --child NAME ARGS_JSON`)


def _teacher():
    from attncache.teacher import TeacherOptions

    return TeacherOptions(name=TEACHER["name"], pretrained=False, image_size=TEACHER["image_size"],
                          args=dict(TEACHER["args"]))


def _import_attncache() -> tuple[float, str]:
    start = time.perf_counter()
    import attncache
    import attncache.cache  # noqa: F401 - what open_cache needs (torch, codecs, store)

    return time.perf_counter() - start, attncache.__file__


def child_extract(a: dict) -> dict:
    import resource

    start = time.perf_counter()
    import attncache.extract
    from attncache.recipes import extract_config

    _teacher().build()  # timm imported and a teacher built once: the baseline holds what does not scale with N
    import_s = time.perf_counter() - start
    base = rss_mb()
    timeline: list[tuple[float, float]] = []

    def measure():
        value = rss_mb()
        timeline.append((time.perf_counter(), value))
        return value, None

    sampler = Sampler(measure)
    sampler.start()
    marks: list[tuple[float, float]] = []  # (records written, RSS MB) at each finished shard
    stats: dict = {}
    cfg = extract_config(RECIPE, teacher=_teacher(), data=a["data"], out=a["cache"], format=a["format"],
                         views=VIEWS, layers=LAYERS, codec=CODEC, batch_size=a["batch_size"], workers=a["workers"],
                         progress=False)
    t0 = time.perf_counter()
    manifest = attncache.extract.extract(cfg, on_shard=lambda i: marks.append((len(marks) + 1, rss_mb())),
                                         stats=stats)
    wall = time.perf_counter() - t0
    sampler.stop()
    per_shard = manifest["store"]["records_per_shard"]
    peak = max(sampler.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    out = {"extract_s": wall, "extract_import_s": import_s, "extract_pipeline_s": stats.get("pipeline_s"),
           "extract_records": stats.get("records"), "extract_rss_base_mb": base, "extract_rss_peak_mb": peak,
           "extract_rss_growth_b_per_record": (peak - base) * 2**20 / manifest["store"]["records"],
           "records_per_shard": per_shard, "shards": len(manifest["store"]["shards"])}
    if stats.get("pipeline_s") is not None:  # RSS when the pipeline started (after scan, views, index files)
        t_pipe = t0 + wall - stats["pipeline_s"]
        before = [v for t, v in timeline if t <= t_pipe]
        out["extract_rss_at_pipeline_mb"] = before[-1] if before else None
        out["extract_before_pipeline_s"] = wall - stats["pipeline_s"]
    if len(marks) >= 3:  # least-squares slope of RSS over records written, during the pipeline
        xs = [k * per_shard for k, _ in marks]
        ys = [v * 2**20 for _, v in marks]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        out["extract_pipeline_rss_slope_b_per_record"] = (
            sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0)
    return out


SYNTH_TEMPLATE_IMAGES = 64  # the real extraction whose plan a synthetic cache takes (teacher, codec, views)
SYNTH_DRAWN = 3200  # images whose 4 views are really drawn by the policy; the views table tiles them


def child_synth(a: dict) -> dict:
    """A cache of N records written through the library's own writers, with random maps instead of a teacher's
    (`--maps synthetic`): what a 5.12M-record cache costs a *reader* does not depend on the maps' values, and a
    real extraction of 5.12M records takes ~7 h on 2 cores. Everything else is real:

    - the plan (teacher, capture, codec, views policy) is the manifest of a real `extract()` of the source's first
      images, with the store and dataset sections of N records;
    - the samples table holds the source's real keys, labels, sizes and sha256 (training checks each image);
    - the views table holds the at-distill views of the first SYNTH_DRAWN images, really drawn by the policy
      (RandAugment, erasing, mixup/cutmix partner and its view, 24 drop-path masks), repeated over the images
      with each partner shifted along (so it stays another image; every image is 16x16, so every box fits);
    - the shards are written by the store's writer (`WRITERS[format]`), each marked done as extraction does, and
      `extract.plan.finish` writes and validates the manifest (every file's sha256) exactly as extraction does."""
    import hashlib

    import numpy as np

    import attncache.extract
    from attncache.codecs import FieldSpec
    from attncache.extract import DrawnViews
    from attncache.extract import plan as plans
    from attncache.files import atomic_write_json
    from attncache.recipes import extract_config
    from attncache.store import WRITERS
    from attncache.store import records as rec
    from attncache.store.format import PLAN, dataset_fingerprint
    from attncache.store.tables import TableWriter, write_table
    from attncache.views import ViewPolicy

    t0 = time.perf_counter()
    out, images, per_shard = Path(a["cache"]), a["records"] // VIEWS, a["per_shard"]
    template_dir = out.with_name(out.name + ".template")
    # the template's listing goes to a memo of its own: the row's node memo stays cold for the `list` measurement
    os.environ["ATTNCACHE_MIRROR_DIR"] = str(template_dir.with_name(template_dir.name + ".node"))
    cfg = extract_config(RECIPE, teacher=_teacher(), data=a["data"], out=str(template_dir),
                         format=a["format"], views=VIEWS, layers=LAYERS, codec=CODEC, limit=SYNTH_TEMPLATE_IMAGES,
                         workers=1, progress=False)
    template = attncache.extract.extract(cfg)
    _, spec = _teacher().build()

    keys = [key_of(i) for i in range(images)]
    digests = np.empty((images, 32), np.uint8)
    for i in range(images):
        digests[i] = np.frombuffer(hashlib.sha256(image_png(i)).digest(), np.uint8)
    rows = np.zeros(images, rec.SAMPLE_DTYPE)
    lengths = np.array([len(k) for k in keys], np.int64)
    rows["key_offset"] = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    rows["key_bytes"], rows["label"] = lengths, np.arange(images) % CLASSES
    rows["width"] = rows["height"] = IMAGE_SIDE
    rows["sha256"] = digests
    hexes = [d.tobytes().hex() for d in digests]
    fingerprint = dataset_fingerprint({"key": k, "sha256": h} for k, h in zip(keys, hexes, strict=True))
    per_block = rec.DEFAULT_ROWS_PER_BLOCK
    out.mkdir(parents=True, exist_ok=True)
    entries = {
        rec.SAMPLES_TABLE: write_table(out / rec.SAMPLES_TABLE, rows, per_block[rec.SAMPLES_TABLE]),
        rec.KEYS_TABLE: write_table(out / rec.KEYS_TABLE, np.frombuffer("".join(keys).encode(), np.uint8),
                                    per_block[rec.KEYS_TABLE]),
        rec.KEY_INDEX_TABLE: write_table(out / rec.KEY_INDEX_TABLE, rec.key_index_rows(keys),
                                         per_block[rec.KEY_INDEX_TABLE])}
    drawn_n = min(SYNTH_DRAWN, images)
    first_samples = [{"key": keys[i], "label": int(rows["label"][i]), "sha256": hexes[i], "width": IMAGE_SIDE,
                      "height": IMAGE_SIDE} for i in range(drawn_n)]
    del keys, hexes
    policy = ViewPolicy.from_json(template["views"])
    drawn = DrawnViews(policy, first_samples, spec)
    layout = rec.Layout.of(template)
    tile = rec.record_rows(list(drawn), layout)  # view-major: row v * drawn_n + i
    views = TableWriter(out / rec.VIEWS_TABLE, layout.record_dtype(),
                        rec.rows_per_block_for(layout.record_dtype().itemsize))
    for v in range(VIEWS):
        for first in range(0, images, drawn_n):
            chunk = tile[v * drawn_n:v * drawn_n + min(drawn_n, images - first)].copy()
            if layout.mixes:
                chunk["partner"] = (chunk["partner"] + first) % images
            views.append(chunk)
    entries[rec.VIEWS_TABLE] = views.close()
    tables_s = time.perf_counter() - t0

    records = images * VIEWS
    plan = {k: template[k] for k in ("format", "version", "teacher", "capture", "codec", "views")}
    plan["store"] = {**{k: template["store"][k] for k in plans.PLAN_STORE_KEYS}, "records": records,
                     "records_per_shard": per_shard}
    plan["dataset"] = {**template["dataset"], "num_samples": images, "fingerprint": fingerprint}
    plan["files"] = {}
    atomic_write_json(out / PLAN, plan)
    plans.write_tables_marker(out, entries)
    fields = {k: FieldSpec(tuple(f["shape"]), f["dtype"]) for k, f in plan["codec"]["fields"].items()}
    writer = WRITERS[plan["store"]["format"]](out, fields, plan["codec"]["compressor"], records, per_shard, False)
    rng = np.random.default_rng(0)
    for s in range(plans.num_shards(records, per_shard)):
        n = min(per_shard, records - s * per_shard)
        arrays = {}
        for name, f in fields.items():  # rows of attention-like maps: positive, each query's row sums to 1
            x = rng.random((n, *f.shape), dtype=np.float32) + 1e-3
            arrays[name] = (x / x.sum(-1, keepdims=True)).astype(f.dtype)
        writer.write_shard(s, arrays, [], None)
        plans.write_marker(out, s, writer.shard_paths(s))
    manifest = plans.finish(out)
    return {"synth_s": time.perf_counter() - t0, "synth_tables_s": tables_s, "shards": len(manifest["store"]["shards"]),
            "records_per_shard": per_shard, "synth_drawn_images": drawn_n, "synth_rss_peak_mb": rss_mb()}


def child_list(a: dict) -> dict:
    """The source listed as training lists it (its key index built: every tar's headers walked, or read from
    the node's memo of an earlier listing)."""
    _import_attncache()
    from attncache.sources import open_source

    t = time.perf_counter()
    source = open_source(a["data"], "train", None)
    missing = source.missing_keys([key_of(0)])
    if missing:
        raise SystemExit(f"{a['data']}: {missing[0]} not listed")
    return {"list_s": time.perf_counter() - t, "list_rss_mb": rss_mb()}


def child_open(a: dict) -> dict:
    import_s, where = _import_attncache()
    import attncache

    t = time.perf_counter()
    attncache.open_cache(a["cache"])  # the first open in a process also imports what it needs lazily (timm, ...)
    open_cold_s = time.perf_counter() - t
    t = time.perf_counter()
    cache = attncache.open_cache(a["cache"])  # imports warm
    open_s = time.perf_counter() - t
    t = time.perf_counter()
    cache.view(0)
    view_s = time.perf_counter() - t
    t = time.perf_counter()
    cache.sample(0)
    sample_s = time.perf_counter() - t
    if len(cache) != a["records"]:
        raise SystemExit(f"{a['cache']}: {len(cache)} records, expected {a['records']}")
    return {"attncache": where, "import_s": import_s, "open_cold_s": open_cold_s, "open_s": open_s,
            "first_view_s": view_s, "first_sample_s": sample_s, "open_first_s": open_s + view_s + sample_s,
            "open_rss_mb": rss_mb()}


def child_random(a: dict) -> dict:
    import numpy as np

    _import_attncache()
    import attncache

    cache = attncache.open_cache(a["cache"])
    cache.view(0), cache.sample(0)  # the first touch is measured by `open`
    rows = np.random.default_rng(1).integers(0, len(cache), a["rows"]).tolist()
    times = []
    clock = time.perf_counter_ns
    for r in rows:
        t = clock()
        cache.view(r)
        cache.sample(r)
        times.append(clock() - t)
    times.sort()
    return {"random_row_us": sum(times) / len(times) / 1e3, "random_row_p99_us": times[len(times) * 99 // 100] / 1e3,
            "random_rows": len(rows), "random_rss_mb": rss_mb()}


def child_plan(a: dict) -> dict:
    _import_attncache()
    import attncache
    from attncache.train.loader import RenderSpec, ViewStream

    cache = attncache.open_cache(a["cache"])
    stream = ViewStream(render_spec=RenderSpec.of(cache.teacher), batch_size=a["batch_size"], shuffle=True,
                        seed=0, cache=cache)
    store = cache.manifest["store"]
    native = store["format"]
    out = {}
    for fmt in ("zarr", "wds"):
        store["format"] = fmt  # the order the plan takes; nothing else of the store is read by it
        times, batches = [], 0
        for _ in range(a["repeats"]):
            t = time.perf_counter()
            batches = len(stream.plan(0))
            times.append(time.perf_counter() - t)
        out[f"plan_{fmt}_s"], out[f"plan_{fmt}_min_s"] = times[0], min(times)
        out["plan_batches"] = batches
    store["format"] = native
    out["plan_rss_mb"] = rss_mb()
    return out


def child_train(a: dict) -> dict:
    import_start = time.perf_counter()
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import attncache
    import attncache.train
    from attncache.recipes import train_config

    import_s = time.perf_counter() - import_start
    # What the loader's forkserver (`python -c`, this cwd and environment) imports: the workers' attncache.
    workers_import = subprocess.run([sys.executable, "-c", "import attncache; print(attncache.__file__)"],
                                    stdout=subprocess.PIPE, text=True, check=True).stdout.strip()
    if workers_import != attncache.__file__:
        raise SystemExit(f"the loader workers would import {workers_import}, this process {attncache.__file__}")
    steps: list[float] = []
    pss_at_step: list[float] = []
    tree = TreePss(expect=a["workers"] + 2)  # the training process, the forkserver and the workers
    sampler = Sampler(tree)

    def on_step(optimizer, args, kwargs):
        steps.append(time.perf_counter())
        if len(steps) == 1:
            pss_at_step.append(sampler.sample())

    register_optimizer_step_post_hook(on_step)
    if a["threads"]:
        torch.set_num_threads(a["threads"])
    out_dir = Path(a["out"])
    if out_dir.exists():
        shutil.rmtree(out_dir)
    cfg = train_config(RECIPE, out=str(out_dir), cache=a["cache"], data=a["data"], batch_size=a["batch_size"],
                       workers=a["workers"], max_steps=a["steps"], layers=LAYERS, device="cpu", progress=False,
                       log_every=1)
    base = sampler.sample()
    sampler.start()
    t = tree.t0 = time.perf_counter()
    attncache.train.train(cfg)
    total = time.perf_counter() - t
    sampler.stop()
    if not steps:
        raise SystemExit("no optimizer step was taken")
    return {"attncache": attncache.__file__, "train_import_s": import_s, "first_step_s": steps[0] - t,
            "train_s": total, "steps": len(steps), "workers": a["workers"],
            "step_s": (steps[-1] - steps[0]) / max(1, len(steps) - 1),
            "tree_pss_base_mb": base, "tree_pss_first_step_mb": pss_at_step[0] if pss_at_step else None,
            "tree_pss_peak_mb": sampler.peak, "tree_processes": (sampler.peak_detail or {}).get("processes"),
            "main_pss_at_peak_mb": (sampler.peak_detail or {}).get("main_mb"),
            "pss_at_peak_each_mb": (sampler.peak_detail or {}).get("each_mb"), "workers_up_s": tree.full_at,
            "pss_samples": sampler.samples, "pss_interval_s": sampler.mean_interval, "pss_sampler_cpu_s": sampler.cpu_s}


CHILDREN = {"extract": child_extract, "synth": child_synth, "list": child_list, "open": child_open,
            "random": child_random, "plan": child_plan,
            "train": child_train}


def run_child(name: str, args: dict, timeout: float | None, cwd: Path) -> dict:
    """One measurement in a fresh process; adds the machine's load average (1 min) before and after it.

    It runs in `cwd` (the row's work directory): Python 3.11's forkserver does not apply the sys.path it is handed
    and puts its working directory first, so started from a checkout its DataLoader workers would import *that*
    checkout's attncache, not the one the training process imported (PYTHONPATH)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, json.dumps(args)]
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout, cwd=cwd)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"scale: measurement {name!r} failed (exit {proc.returncode}); output:\n{proc.stdout}")
    return {**json.loads(lines[-1]), f"{name}_load": [round(load, 2), round(os.getloadavg()[0], 2)]}


# ---------------------------------------------------------------------------------------------------------------
# a row


def format_version() -> str:
    try:
        from attncache.store.format import FORMAT_VERSION

        return str(FORMAT_VERSION)
    except ImportError:
        return "unknown"


COLUMNS = [  # (header, key, format)
    ("records", "records", "{:,}"),
    ("first open_cache s", "open_cold_s", "{:.2f}"),
    ("open_cache s", "open_s", "{:.3f}"),
    ("first view + sample s", "first_view_sample_s", "{:.3f}"),
    ("open + first s", "open_first_s", "{:.3f}"),
    ("random row µs", "random_row_us", "{:.1f}"),
    ("plan zarr s", "plan_zarr_s", "{:.3f}"),
    ("plan wds s", "plan_wds_s", "{:.3f}"),
    ("source list s", "list_s", "{:.1f}"),
    ("first step s", "first_step_s", "{:.1f}"),
    ("workers", "workers", "{}"),
    ("tree PSS peak MB", "tree_pss_peak_mb", "{:,.0f}"),
    ("extract s", "extract_s", "{:,.0f}"),
    ("extract RSS peak MB", "extract_rss_peak_mb", "{:,.0f}"),
    ("RSS growth B/record", "extract_rss_growth_b_per_record", "{:,.0f}"),
    ("synthetic build s", "synth_s", "{:,.0f}"),
]


def table(rows: list[dict]) -> str:
    head = ["label"] + [h for h, _, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.get("label", "")]
        for _, key, fmt in COLUMNS:
            v = r.get(key)
            cells.append(fmt.format(v) if isinstance(v, (int, float)) else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def slopes(rows: list[dict]) -> str:
    """Per label: each figure's change per million records, between its smallest and largest N."""
    out = []
    group = lambda r: (r.get("label", ""), r.get("workers"), r.get("format"))  # noqa: E731
    for label, workers, fmt in dict.fromkeys(group(r) for r in rows):
        mine = sorted((r for r in rows if group(r) == (label, workers, fmt)), key=lambda r: r["records"])
        lo, hi = mine[0], mine[-1]  # the latest row of each N counts
        lo = [r for r in mine if r["records"] == lo["records"]][-1]
        if lo["records"] == hi["records"]:
            continue
        per = 1e6 / (hi["records"] - lo["records"])
        parts = []
        for h, key, _ in COLUMNS[1:]:
            if isinstance(lo.get(key), (int, float)) and isinstance(hi.get(key), (int, float)) and key != "workers":
                parts.append(f"{h} {(hi[key] - lo[key]) * per:+,.3g}")
        out.append(f"- {label}, {fmt}, {workers} workers: per million records ({lo['records']:,} -> "
                   f"{hi['records']:,}): " + "; ".join(parts))
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, help="N, a multiple of 4 (N/4 images x 4 views)")
    p.add_argument("--work", type=Path, default=Path("/tmp/attncache_scale"),
                   help="where sources and caches are built (reused by a later run of the same N)")
    p.add_argument("--label", default=None, help="tag of this row (default: the cache format version)")
    p.add_argument("--format", choices=("zarr", "wds"), default="zarr", help="the cache's store format")
    p.add_argument("--source", choices=("wds", "folder"), default="wds", help="webdataset tars or an ImageFolder")
    p.add_argument("--images-per-tar", type=int, default=1000)
    p.add_argument("--workers", type=int, default=8, help="training loader workers")
    p.add_argument("--batch-size", type=int, default=64, help="training batch (and the plan's)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 2 per worker, at least 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads of the training process (0: default)")
    p.add_argument("--rows", type=int, default=10_000, help="random rows read by the metadata measurement")
    p.add_argument("--repeats", type=int, default=3, help="epoch plans drawn per order (the first is reported)")
    p.add_argument("--extract-batch-size", type=int, default=256)
    p.add_argument("--extract-workers", type=int, default=1,
                   help="extraction render threads, also the scan's (more than 1 can race on a webdataset "
                   "source's shared file handles)")
    p.add_argument("--maps", choices=("teacher", "synthetic"), default="teacher",
                   help="teacher: a real extraction; synthetic: the library's writers with random maps (see "
                   "child_synth: every metadata file real, 5.12M records in minutes, not hours)")
    p.add_argument("--records-per-shard", type=int, default=256,
                   help="shard size of a synthetic cache (256: 20,000 shards at 5.12M, as a ViT-L cache has)")
    p.add_argument("--only", default="list,open,random,plan,train",
                   help="measurements to run (the extraction is measured whenever the cache is built)")
    p.add_argument("--results", type=Path, default=None, help="JSON lines appended to (default: WORK/results.jsonl)")
    p.add_argument("--build-only", action="store_true", help="build the source and the cache, measure nothing else")
    p.add_argument("--no-warm", action="store_true", help="do not read the files before measuring")
    p.add_argument("--timeout", type=float, default=None, help="seconds per measurement")
    p.add_argument("--table", type=Path, metavar="RESULTS", help="print the table and slopes of a results file")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        name, payload = args.child
        print(json.dumps(CHILDREN[name](json.loads(payload))), flush=True)
        return
    if args.table:
        rows = [json.loads(line) for line in args.table.read_text().splitlines() if line.strip()]
        print(table(rows))
        print()
        print(slopes(rows))
        return
    if not args.records or args.records % VIEWS:
        p.error(f"--records: a positive multiple of {VIEWS}")

    import attncache

    args.work = args.work.resolve()
    label = args.label or f"v{format_version()}"
    images = args.records // VIEWS
    row_dir = args.work / f"n{args.records}"
    src_dir = row_dir / f"source-{args.source}"
    synthetic = args.maps == "synthetic"
    cache_dir = row_dir / (f"cache-{args.format}-v{format_version()}"  # one per format version of the code
                           + (f"-synthetic{args.records_per_shard}" if synthetic else ""))
    extract_file = cache_dir.with_name(cache_dir.name + ".extract.json")
    results = args.results or args.work / "results.jsonl"
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    row = {"label": label, "records": args.records, "images": images, "format": args.format, "source": args.source,
           "format_version": format_version(), "attncache": attncache.__file__, "cores": os.cpu_count(),
           "batch_size": args.batch_size, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    say = lambda msg: print(f"scale: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    say(f"attncache {attncache.__file__}, format version {format_version()}, {args.records:,} records")

    t = time.perf_counter()
    source = build_source(src_dir, images, args.source, args.images_per_tar)
    say(f"source {source['data']} ready ({time.perf_counter() - t:.1f} s here, built in {source['build_s']:.1f} s)")
    row["source_build_s"] = source["build_s"]

    # The node memo of the source's listing lives in the row's folder: cold on the row's first run, as on a new node.
    os.environ["ATTNCACHE_MIRROR_DIR"] = str(row_dir / "node")
    if synthetic and not ((cache_dir / "manifest.json").is_file() and extract_file.is_file()):
        say(f"writing {args.records:,} records with synthetic maps into {cache_dir} ...")
        extraction = run_child("synth", {"data": source["data"], "cache": str(cache_dir), "format": args.format,
                                         "records": args.records, "per_shard": args.records_per_shard}, None, row_dir)
        extract_file.write_text(json.dumps(extraction))
        say(f"written in {extraction['synth_s']:.0f} s ({extraction['shards']:,} shards)")
    elif (cache_dir / "manifest.json").is_file() and extract_file.is_file():
        extraction = json.loads(extract_file.read_text())
        say(f"cache {cache_dir} reused")
    else:
        resumed = cache_dir.exists()
        say(f"extracting {args.records:,} records into {cache_dir}{' (resuming)' if resumed else ''} ...")
        extraction = run_child("extract", {"data": source["data"], "cache": str(cache_dir), "format": args.format,
                                           "batch_size": args.extract_batch_size, "workers": args.extract_workers},
                               None, row_dir)
        extraction["extract_resumed"] = resumed
        extract_file.write_text(json.dumps(extraction))
        say(f"extracted in {extraction['extract_s']:.0f} s, peak RSS {extraction['extract_rss_peak_mb']:.0f} MB")
    row.update(extraction)
    row["maps"] = args.maps
    if args.build_only:
        return
    if args.source == "wds" and "list" in only:
        memo_warm = (row_dir / "node").is_dir()
        row.update(run_child("list", {"data": source["data"]}, args.timeout, row_dir), list_memo_warm=memo_warm)
        say(f"source listed in {row['list_s']:.1f} s ({'warm' if memo_warm else 'cold'} node memo)")

    if not args.no_warm:
        mb = warm([cache_dir, src_dir])
        say(f"read {mb:,.0f} MB of cache and source (warm pages)")
    row["pages"] = "cold" if args.no_warm else "warm"
    common = {"cache": str(cache_dir), "records": args.records, "data": source["data"]}
    if "open" in only:
        row.update(run_child("open", common, args.timeout, row_dir))
        row["first_view_sample_s"] = row["first_view_s"] + row["first_sample_s"]
        say(f"open {row['open_s']:.3f} s, first view {row['first_view_s']:.3f} s, sample {row['first_sample_s']:.4f} s")
    if "random" in only:
        row.update(run_child("random", {**common, "rows": args.rows}, args.timeout, row_dir))
        say(f"random row {row['random_row_us']:.1f} µs")
    if "plan" in only:
        row.update(run_child("plan", {**common, "batch_size": args.batch_size, "repeats": args.repeats},
                             args.timeout, row_dir))
        say(f"plan zarr {row['plan_zarr_s']:.3f} s, wds {row['plan_wds_s']:.3f} s")
    if "train" in only:
        steps = args.steps or max(2, 2 * args.workers)
        row.update(run_child("train", {**common, "out": str(row_dir / f"train-{label}"), "workers": args.workers,
                                       "batch_size": args.batch_size, "steps": steps, "threads": args.threads},
                             args.timeout, row_dir))
        say(f"first step {row['first_step_s']:.1f} s, tree PSS peak {row['tree_pss_peak_mb']:.0f} MB "
            f"({row['tree_processes']} processes)")
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(table([row]))


if __name__ == "__main__":
    main()

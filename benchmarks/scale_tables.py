#!/usr/bin/env python
"""Spot check of format version 5's metadata read path at ImageNet x 4 views, without extracting 5.12M records.

It writes the record tables of N images x 4 views in the exact layout of an `at-distill` cache of a ViT-L-depth
teacher (RandAugment, erasing, mixup/cutmix partners, 24 drop-path masks), with rows tiled from 12,800 views really
drawn by the policy (partners shifted so that each stays another image), and a manifest of 20,000 shards (for
N = 1.28M) whose shard files do not exist: no map is read. Then, imports warm: open_cache, the first record's view
and sample, random rows (a checked `View` + sample dict, and the raw table rows), a lookup by key, and the epoch
plan in both orders. What it cannot show (first training step, a training tree's PSS, extraction): scale.py.

    python benchmarks/scale_tables.py /tmp/meta5m 1280000
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

import attncache
from attncache.extract import ExtractConfig, extract
from attncache.recipes import RECIPES
from attncache.store import records
from attncache.store.format import seal, shard_paths
from attncache.store.tables import TableWriter, write_table
from attncache.teacher import TeacherOptions
from attncache.train.loader import RenderSpec, ViewStream
from attncache.views import ViewPolicy

VIEWS, SIZE, DEPTH, DRAWN, PER_SHARD = 4, 16, 24, 3200, 256
POLICY = ViewPolicy(views_per_image=VIEWS, seed=0, augment=RECIPES["at-distill"].augment)


def tiny_manifest(work: Path) -> dict:
    """A real manifest of the teacher and policy (a micro ViT at ViT-L depth), to scale up."""
    tiny = work / "tiny"
    if not (tiny / "manifest.json").exists():
        t = TeacherOptions(name="vit_tiny_patch16_224", image_size=SIZE, pretrained=False,
                           args={"patch_size": 8, "depth": DEPTH, "embed_dim": 16, "num_heads": 2})
        extract(ExtractConfig(teacher=t, data="demo:1", out=str(tiny), views=VIEWS, codec="cls", progress=False,
                              augment=POLICY.augment, format="wds"))
    return json.loads((tiny / "manifest.json").read_text())


def write_tables(root: Path, n: int) -> dict:
    samples = [{"key": f"n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG", "label": i % 1000, "sha256": f"{i:064x}",
                "width": 500, "height": 375} for i in range(n)]
    start = time.perf_counter()
    drawn = [POLICY.view(samples[:DRAWN], i, v, SIZE, depth=DEPTH) for v in range(VIEWS) for i in range(DRAWN)]
    print(f"drew {len(drawn)} views in {time.perf_counter() - start:.1f} s")
    layout = records.Layout.of({"views": POLICY.to_json(), "teacher": {"depth": DEPTH}})
    tile = records.record_rows(drawn, layout)
    rows, heap = records.sample_rows(samples)
    per_block = records.DEFAULT_ROWS_PER_BLOCK
    entries = {
        records.SAMPLES_TABLE: write_table(root / records.SAMPLES_TABLE, rows, per_block[records.SAMPLES_TABLE]),
        records.KEYS_TABLE: write_table(root / records.KEYS_TABLE, np.frombuffer(heap, np.uint8),
                                        per_block[records.KEYS_TABLE]),
        records.KEY_INDEX_TABLE: write_table(root / records.KEY_INDEX_TABLE,
                                             records.key_index_rows([s["key"] for s in samples]),
                                             per_block[records.KEY_INDEX_TABLE])}
    dtype = layout.record_dtype()
    writer = TableWriter(root / records.VIEWS_TABLE, dtype, records.rows_per_block_for(dtype.itemsize))
    for v in range(VIEWS):
        for first in range(0, n, DRAWN):
            chunk = tile[v * DRAWN:v * DRAWN + min(DRAWN, n - first)].copy()
            chunk["partner"] = (chunk["partner"] + first) % n
            writer.append(chunk)
    entries[records.VIEWS_TABLE] = writer.close()
    print("tables: " + ", ".join(f"{k} {e['bytes'] / 1e6:.0f} MB" for k, e in entries.items()))
    return entries


def write_manifest(root: Path, m: dict, n: int, entries: dict) -> None:
    m["dataset"].update(num_samples=n, classes=[f"c{i}" for i in range(1000)])
    m["store"].update(records=n * VIEWS, records_per_shard=PER_SHARD)
    m["store"]["shards"] = [
        {"index": i, "first_record": i * PER_SHARD, "records": min(PER_SHARD, n * VIEWS - i * PER_SHARD),
         "files": [{"path": p, "bytes": 1 << 20, "sha256": "ab" * 32}
                   for p in shard_paths("wds", m["codec"]["fields"], i)]}
        for i in range(-(-n * VIEWS // PER_SHARD))]
    m["files"] = entries
    (root / "manifest.json").write_text(json.dumps(seal(m), indent=2))
    print(f"manifest {(root / 'manifest.json').stat().st_size / 1e6:.1f} MB, {len(m['store']['shards'])} shards")


def measure(root: Path, n: int) -> None:
    attncache.open_cache(str(root))  # the first open imports what opening needs lazily (timm, jsonschema)
    start = time.perf_counter()
    cache = attncache.open_cache(str(root))
    opened = time.perf_counter()
    cache.view(0), cache.sample(0)
    first = time.perf_counter()
    print(f"open_cache {opened - start:.3f} s, first view + sample {(first - opened) * 1e3:.1f} ms")
    rows = np.random.default_rng(0).integers(0, len(cache), 20_000).tolist()
    start = time.perf_counter()
    for r in rows:
        cache.view(r), cache.sample(r)
    print(f"random row, checked View + sample: {(time.perf_counter() - start) / len(rows) * 1e6:.1f} us")
    views, samples = cache.records.views_table, cache.records.samples_table
    start = time.perf_counter()
    for r in rows:
        views.row(r), samples.row(r % n)
    print(f"random row, the raw rows (block read, crc32c): {(time.perf_counter() - start) / len(rows) * 1e6:.1f} us")
    key = cache.sample_at(n // 3)["key"]
    start = time.perf_counter()
    cache.row(key)
    print(f"lookup by key {(time.perf_counter() - start) * 1e6:.0f} us")
    for store in ("zarr", "wds"):
        cache.manifest["store"]["format"] = store  # the plan reads nothing else of the store
        stream = ViewStream(render_spec=RenderSpec.of(cache.teacher), batch_size=256, shuffle=True, seed=0,
                            cache=cache, rank=0, world_size=8)
        start = time.perf_counter()
        plan = stream.plan(3)
        print(f"epoch plan ({store} order): {time.perf_counter() - start:.3f} s, {len(plan)} batches for rank 0/8")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    work, n = Path(sys.argv[1]), int(sys.argv[2])
    root = work / "tables"
    root.mkdir(parents=True, exist_ok=True)
    manifest = tiny_manifest(work)
    if not (root / "manifest.json").exists():
        write_manifest(root, manifest, n, write_tables(root, n))
    measure(root, n)

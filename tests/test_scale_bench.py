"""The scale benchmark (benchmarks/scale.py, issue 22) runs end to end at a tiny N and reports every figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"

FIGURES = ["open_cold_s", "open_s", "first_view_s", "open_first_s", "random_row_us", "plan_zarr_s", "plan_wds_s",
           "first_step_s", "tree_pss_peak_mb", "extract_s", "extract_rss_peak_mb", "import_s", "train_s"]


@pytest.mark.long
def test_scale_bench_small(tmp_path):
    work = tmp_path / "work"
    cmd = [sys.executable, str(SCRIPT), "--records", "200", "--work", str(work), "--label", "test", "--workers",
           "1", "--steps", "1", "--batch-size", "8", "--rows", "100", "--repeats", "1", "--images-per-tar", "20"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    row = rows[0]
    assert row["records"] == 200 and row["images"] == 50 and row["workers"] == 1 and row["steps"] >= 1
    for name in FIGURES:
        assert isinstance(row.get(name), (int, float)) and row[name] > 0, (name, row.get(name))
    assert row["first_sample_s"] >= 0 and row["extract_rss_growth_b_per_record"] is not None
    assert row["tree_processes"] >= 2  # the training process and its worker (and the forkserver)
    assert "| test | 200 |" in run.stdout  # the markdown row
    # A second run reuses the source and the cache (and says so).
    again = subprocess.run(cmd + ["--build-only"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reused" in again.stderr and "extracting" not in again.stderr
    table = subprocess.run([sys.executable, str(SCRIPT), "--table", str(work / "results.jsonl")],
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and table.stdout.count("| test | 200 |") == 1


@pytest.mark.long
def test_synthetic_maps_build_a_real_cache_of_real_views(tmp_path):
    """`--maps synthetic` (the 5.12M row): everything but the maps is what extraction writes. The cache passes a
    full `verify`, its images check against the real source, and each record's view is the one the cache's own
    policy draws for that record (the views of the first images are drawn, not made up)."""
    from attncache import open_cache
    from attncache.extract import DrawnViews
    from attncache.sources import open_source
    from attncache.teacher import TeacherSpec
    from attncache.tools.verify import verify_cache
    from attncache.train.loader import check_images

    work = tmp_path / "work"
    cmd = [sys.executable, str(SCRIPT), "--records", "400", "--work", str(work), "--maps", "synthetic",
           "--records-per-shard", "16", "--images-per-tar", "40", "--build-only"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (cache_dir,) = (work / "n400").glob("cache-zarr-*-synthetic16")
    cache = open_cache(str(cache_dir))
    assert len(cache) == 400 and len(cache.manifest["store"]["shards"]) == 25
    assert verify_cache(str(cache_dir))["records"] == 400  # raises on any bad file, chunk or record
    source = open_source(str(work / "n400" / "source-wds" / "shard-{00000..00002}.tar"))
    check_images(cache, source, "cache", "data")
    samples = [cache.sample_at(i) for i in range(cache.num_samples)]
    drawn = DrawnViews(cache.policy, samples, TeacherSpec.from_json(cache.manifest["teacher"]))
    assert all(cache.view(r) == drawn[r] for r in range(len(cache)))
    assert any(cache.view(r).mix is not None for r in range(len(cache)))  # the recipe's mixed views are there

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

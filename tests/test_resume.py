"""Interrupted runs resume to the bit: Ctrl-C, SIGKILL at random points, drop-path on, several workers, torn files.

The reference is always an uninterrupted run of the same command; "the same" means equal bytes of the final
weights (model and EMA), equal metrics lines (timing fields aside), and for caches every record decoded equal and
the same manifest (timestamps aside), with no file the format does not name.
"""

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
from conftest import TinyTeacher, _save_teacher

from attncache import open_cache
from attncache.store.records import TABLES
from attncache.train import TrainConfig, train
from attncache.train.checkpoint import CHECKPOINT

# Deep enough (4 blocks, drop-path draws per block) and slow enough per step (65 tokens, width 96) for kills to
# land in the middle of training rather than only around it.
KILL_VIT = dict(name="vit_tiny_patch16_224", image_size=64, args=dict(patch_size=8, depth=4, embed_dim=96,
                                                                      num_heads=4))


@pytest.fixture(scope="module")
def kill_teacher(tmp_path_factory) -> TinyTeacher:
    return _save_teacher(KILL_VIT, tmp_path_factory.mktemp("kill_teacher") / "vit.safetensors")


@pytest.fixture(scope="module")
def kill_caches(tmp_path_factory, kill_teacher) -> dict[str, Path]:
    """A train cache (demo:8 = 32 images, 2 views) and a val cache of the deeper teacher."""
    from attncache.extract import extract

    root = tmp_path_factory.mktemp("kill_caches")
    extract(kill_teacher.config("demo:8", root / "train", views=2, records_per_shard=16))
    extract(kill_teacher.config("demo:4", root / "val", split="val"))
    return {"train": root / "train", "val": root / "val"}


def cli(*args, **kw) -> subprocess.Popen:
    """`python -m attncache ARGS` in its own process group (so a kill reaches its loader workers too)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "attncache", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=env, **kw)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def metrics(run: Path) -> list[dict]:
    """metrics.jsonl without its timing field."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in lines]


def train_lines(run: Path) -> int:
    path = run / "metrics.jsonl"
    return sum(1 for x in path.read_text().splitlines() if '"train"' in x) if path.exists() else 0


def assert_same_run(a: Path, b: Path) -> None:
    for name in ("model.safetensors", "ema.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert metrics(a) == metrics(b)
    assert json.loads((a / "results.json").read_text()) == json.loads((b / "results.json").read_text())


def train_args(caches, out: Path, **overrides) -> list[str]:
    opts = {"--mode": "distill", "--cache": caches["train"], "--data": "demo:8", "--val-cache": caches["val"],
            "--val-data": "demo:4", "--out": out, "--epochs": 2, "--batch-size": 2, "--lr": "1e-3",
            "--warmup-epochs": "0.5", "--drop-path": "0.2", "--ema": "0.9", "--workers": 2, "--log-every": 1,
            "--save-every": 3, **overrides}
    return ["train", *[str(x) for kv in opts.items() for x in kv], "--quiet", "--json"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, kill_caches) -> tuple[Path, float]:
    """The uninterrupted run (and its wall time) every interrupted one is compared with."""
    out = tmp_path_factory.mktemp("reference") / "run"
    start = time.perf_counter()
    rc, stdout, stderr = finish(cli(*train_args(kill_caches, out)))
    assert rc == 0, stderr
    assert json.loads(stdout)["steps"] == 32  # 32 images, batch 2, 2 epochs: 16 steps per epoch
    return out, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------------
# training


@pytest.mark.long
def test_ctrl_c_checkpoints_the_true_step(tmp_path, kill_caches, reference_run):
    """Regression: Ctrl-C mid-epoch saved the step the epoch started at (`step` was stale while `consumed` moved
    on), and the resumed run ended 7 steps in with other weights. Now the signal stops the loop at a step boundary,
    the checkpoint holds the true position, and the resumed run equals the uninterrupted one byte for byte."""
    out = tmp_path / "run"
    proc = cli(*train_args(kill_caches, out))
    while train_lines(out) < 21 and proc.poll() is None:  # mid-epoch 2 (steps 17..32), past a checkpoint
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    rc, _, err = finish(proc)
    assert rc == 128 + signal.SIGINT, err
    assert err.strip().splitlines()[-1].startswith("interrupted: SIGINT: stopped at step ")
    state = torch.load(out / CHECKPOINT, weights_only=True)
    done = train_lines(out)
    assert state["position"]["step"] == done and done >= 21 and state["metrics_lines"] == len(metrics(out))
    assert state["position"]["batch"] == done - 16 and state["position"]["epoch"] == 1
    rc, _, err = finish(cli(*train_args(kill_caches, out)))
    assert rc == 0, err
    assert_same_run(out, reference_run[0])


def test_a_signal_right_after_an_evaluation_does_not_redo_it(tmp_path, kill_caches, monkeypatch):
    """Regression: SIGTERM that arrived after an epoch's evaluation was logged, before the epoch-end checkpoint,
    saved the epoch as not yet evaluated; the resumed run evaluated it again and metrics.jsonl held that epoch's
    line twice (found in a benchmark killed with pkill). Now the checkpoint counts the epoch as done, and the
    resumed run's metrics, weights and results equal an uninterrupted run's."""
    from attncache.errors import RunInterrupted
    from attncache.train.engine import Engine

    def config(out):
        return TrainConfig(mode="distill", cache=str(kill_caches["train"]), data="demo:8",
                           val_cache=str(kill_caches["val"]), val_data="demo:4", out=str(out), epochs=2,
                           batch_size=4, lr=1e-3, warmup_epochs=0.5, drop_path=0.2, workers=0, log_every=2,
                           progress=False)

    train(config(tmp_path / "reference"))
    say = Engine._say

    def signal_after_the_first_evaluation(self, msg):
        say(self, msg)
        if msg.startswith("epoch 1:"):
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the run's handler, like a `kill` from outside

    monkeypatch.setattr(Engine, "_say", signal_after_the_first_evaluation)
    out = tmp_path / "run"
    with pytest.raises(RunInterrupted):
        train(config(out))
    assert [m["epoch"] for m in metrics(out) if m["kind"] == "eval"] == [1]
    monkeypatch.setattr(Engine, "_say", say)
    train(config(out))
    assert [m["epoch"] for m in metrics(out) if m["kind"] == "eval"] == [1, 2]
    assert metrics(out) == metrics(tmp_path / "reference")
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "reference" / "model.safetensors").read_bytes()


def test_drop_path_mid_epoch_resume_is_exact(tmp_path, kill_caches):
    """Regression: each DataLoader iterator drew its base seed from the global RNG, at another point in a resumed
    run than in an uninterrupted one, so with drop-path the weights differed (1.5e-3 after 5 steps). Deep model,
    drop-path 0.2, two workers, stopped mid-epoch by --max-steps, in process."""
    kw = dict(mode="distill", cache=str(kill_caches["train"]), data="demo:8", epochs=2, batch_size=2, lr=1e-3,
              drop_path=0.2, ema=0.9, workers=2, log_every=1, progress=False, val_cache=str(kill_caches["val"]),
              val_data="demo:4")
    straight = train(TrainConfig(out=str(tmp_path / "straight"), **kw))
    for stop in (5, 19, 23):
        assert train(TrainConfig(out=str(tmp_path / "resumed"), max_steps=stop, **kw)) == \
            {"stopped_at_step": stop, "epoch": stop // 16}
    assert train(TrainConfig(out=str(tmp_path / "resumed"), **kw)) == straight
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def _kill_when(proc: subprocess.Popen, reached, delay: float) -> bool:
    """SIGKILL the process group once `reached()` holds, `delay` seconds later; False if it exited first."""
    while not reached() and proc.poll() is None:
        time.sleep(0.001)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


@pytest.mark.long
def test_sigkill_at_random_points_resumes_to_the_bit(tmp_path, kill_caches, reference_run):
    """SIGKILL of the whole process group at 10 random points, the same command re-run after each: 3 in start-up
    (by time), 7 after a random step plus a random delay (so they land mid-step, in checkpoint writes, in the
    evaluation at an epoch end, in the final writes). The final weights and metrics are the uninterrupted run's,
    byte for byte, and the run directory holds no temporary file."""
    reference, _ = reference_run
    rng = random.Random(1234)
    out = tmp_path / "run"
    schedule = [("time", rng.uniform(0.5, 4.0)) for _ in range(3)]
    schedule += [("step", t) for t in sorted(rng.sample(range(1, 31), 7))]
    killed = []
    for kind, at in schedule:
        proc = cli(*train_args(kill_caches, out))
        start = time.perf_counter()
        if kind == "time":
            hit = _kill_when(proc, lambda s=start, t=at: time.perf_counter() - s >= t, 0)
        else:
            hit = _kill_when(proc, lambda t=at: train_lines(out) >= t, rng.uniform(0, 0.08))
        if hit:
            killed.append((kind, at, train_lines(out)))
    assert len(killed) >= 8, killed
    rc, _, err = finish(cli(*train_args(kill_caches, out)))
    assert rc == 0, err
    assert_same_run(out, reference)
    assert not list(out.rglob("*.partial"))


@pytest.mark.long
def test_torn_metrics_line_is_dropped_not_fatal(tmp_path, kill_caches, reference_run):
    """Regression: a kill during a metrics write left a torn last line and the re-run died with JSONDecodeError.
    The torn tail is dropped, the lines before it are kept, and the finished run equals the uninterrupted one."""
    out = tmp_path / "run"
    rc, _, err = finish(cli(*train_args(kill_caches, out, **{"--max-steps": 10})))
    assert rc == 0, err
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 11, "ep')  # a line cut mid-write, no newline
    (out / "checkpoints" / ".last.pt.x1y2z3.partial").write_bytes(b"half a checkpoint")
    rc, _, err = finish(cli(*train_args(kill_caches, out)))
    assert rc == 0, err
    assert_same_run(out, reference_run[0])
    assert not (out / "checkpoints" / ".last.pt.x1y2z3.partial").exists()


@pytest.mark.long
def test_worker_count_may_change_between_resumes(tmp_path, kill_caches, reference_run):
    """The batch sequence does not depend on the worker count, so a run stopped with 2 workers resumes with 0 or 3
    and still ends with the uninterrupted run's weights (for either store format)."""
    out = tmp_path / "run"
    for workers, stop in ((2, 7), (0, 13), (3, 22)):
        rc, _, err = finish(cli(*train_args(kill_caches, out, **{"--max-steps": stop, "--workers": workers})))
        assert rc == 0, err
    rc, _, err = finish(cli(*train_args(kill_caches, out, **{"--workers": 1})))
    assert rc == 0, err
    assert_same_run(out, reference_run[0])


# ---------------------------------------------------------------------------------------------------------------
# extraction


def extract_args(teacher: TinyTeacher, out: Path, fmt: str) -> list[str]:
    args = ["extract", *teacher.cli_args(), "--data", "demo:16", "--out", out, "--views", "2", "--format", fmt,
            "--shard-records", "8", "--batch-size", "4"]
    return [str(a) for a in (args + ["--embed-images"] if fmt == "wds" else args)]


def cache_contents(root: Path) -> tuple[dict, torch.Tensor, list, list]:
    cache = open_cache(str(root))
    manifest = {k: v for k, v in cache.manifest.items() if k not in ("created_at", "content_sha256")}
    tables = [(root / name).read_bytes() for name in TABLES]  # byte for byte, and as read:
    return manifest, cache.read_rows(list(range(len(cache)))), tables, [cache.view_json(r) for r in range(len(cache))]


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
@pytest.mark.long
def test_sigkill_extraction_at_random_points(tmp_path, kill_teacher, fmt):
    """SIGKILL at 10 random points of an extraction (right after the claim, mid-shard, between shards, around the
    manifest), re-run after each: the final cache equals an uninterrupted run's (every record decoded and compared,
    manifest minus its timestamp), `verify` passes (it reports any file the manifest does not name), and no
    temporary or resume file is left."""
    from attncache.tools.verify import verify_cache

    reference = tmp_path / "reference"
    rc, _, err = finish(cli(*extract_args(kill_teacher, reference, fmt)))
    assert rc == 0, err
    rng = random.Random(99 if fmt == "zarr" else 7)
    out = tmp_path / "cache"

    def markers() -> int:
        return len(list((out / ".progress").glob("shard-*.json"))) if (out / ".progress").is_dir() else 0

    killed = []
    for target in [0, 0] + sorted(rng.sample(range(1, 16), 8)):  # 16 shards of 8 records
        proc = cli(*extract_args(kill_teacher, out, fmt))
        reached = (lambda: (out / ".progress" / "plan.json").exists()) if target == 0 else \
            (lambda t=target: markers() >= t)
        if _kill_when(proc, reached, rng.uniform(0, 0.03)):
            killed.append((target, markers()))
    assert len(killed) >= 8, killed
    rc, _, err = finish(cli(*extract_args(kill_teacher, out, fmt)))
    assert rc == 0, err
    got, want = cache_contents(out), cache_contents(reference)
    assert got[0] == want[0] and torch.equal(got[1], want[1]) and got[2:] == want[2:]
    verify_cache(str(out))
    assert not [p for p in out.rglob("*") if p.name.endswith(".partial") or ".progress" in p.parts]

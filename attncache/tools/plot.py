"""`attncache plot`: the training curves of several runs in one PNG.

Two panels over optimizer steps: the training loss (one point per metrics line) and val top-1 (one per epoch's
evaluation; the EMA's dashed). A run keeps one colour in both, labelled by its folder name. The curves come from
each run's metrics.jsonl, the source of truth (RUN/tensorboard/ is a copy for TensorBoard's viewer); a run still
training can be plotted (its torn last line, if any, is left out).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AttncacheError
from ..files import StrictJSONError, loads_strict
from ..train.checkpoint import METRICS


@dataclass
class RunCurves:
    label: str
    loss: list[tuple[int, float]] = field(default_factory=list)  # (step, training loss)
    top1: list[tuple[int, float]] = field(default_factory=list)  # (step, val top-1 %)
    top1_ema: list[tuple[int, float]] = field(default_factory=list)


def read_metrics(run: str | Path) -> list[dict]:
    """The whole lines of a run's metrics.jsonl (read only: the run may be training right now)."""
    path = Path(run) / METRICS
    if not Path(run).is_dir():
        raise AttncacheError(f"{run}: not a directory (pass training run directories)")
    if not path.is_file():
        raise AttncacheError(f"{run}: no {METRICS} (not a training run, or one that has not logged a line yet)")
    data = path.read_bytes()
    lines = data[:data.rfind(b"\n") + 1].splitlines()  # a line without its newline is still being written
    try:
        return [loads_strict(line) for line in lines]
    except StrictJSONError as exc:
        raise AttncacheError(f"{path}: {exc}") from exc


def run_curves(run: str | Path, label: str) -> RunCurves:
    curves = RunCurves(label)
    for r in read_metrics(run):
        for key, points in (("loss", curves.loss), ("val_top1", curves.top1), ("val_top1_ema", curves.top1_ema)):
            if r.get(key) is not None:  # a diverged loss is logged as null
                points.append((r["step"], r[key]))
    return curves


def labels(runs: list[str | Path]) -> list[str]:
    """Folder names; the paths as given where two runs share a name (a/run, b/run)."""
    names = [Path(r).resolve().name for r in runs]
    return names if len(set(names)) == len(names) else [str(r) for r in runs]


def plot_runs(runs: list[str | Path], out: str | Path) -> Path:
    """Write the PNG of the runs' loss and val top-1 curves; every run is read before anything is drawn."""
    if not runs:
        raise AttncacheError("pass at least one training run directory")
    all_curves = [run_curves(run, label) for run, label in zip(runs, labels(runs), strict=True)]
    return figure(all_curves, out)


def figure(all_curves: list[RunCurves], out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, top1_ax) = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, curves in enumerate(all_curves):
        # Runs often share whole curves (the same top-1 every epoch on a small val set): each run's line is
        # narrower than the one before, so an earlier run shows as a border around a later one, never hidden.
        style = dict(color=colours[i % len(colours)], linewidth=1.5 + 2.0 * (len(all_curves) - 1 - i) /
                     max(1, len(all_curves) - 1))
        _line(loss_ax, curves.loss, curves.label, **style)
        _line(top1_ax, curves.top1, curves.label, marker="o", **style)
        _line(top1_ax, curves.top1_ema, f"{curves.label} EMA", marker="o", linestyle="--", **style)
    loss_ax.set(title="training loss", xlabel="step", ylabel="loss")
    top1_ax.set(title="val top-1", xlabel="step", ylabel="top-1 (%)")
    for ax in (loss_ax, top1_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if not any(curves.top1 for curves in all_curves):
        top1_ax.text(0.5, 0.5, "no evaluation (train with --val-data)", ha="center", va="center",
                     transform=top1_ax.transAxes)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _line(ax, points: list[tuple[int, float]], label: str, **style) -> None:
    if points:
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, label=label, markersize=2 * style["linewidth"], **style)

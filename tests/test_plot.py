"""Training curves: TensorBoard event files mirror metrics.jsonl (a resumed run's too, no step twice), and
`attncache plot` draws several runs' loss and val top-1 from their metrics.jsonl, one colour per run.

The runs are real (the trainer on the tiny fp32 cache: 6 images, batch 2, 2 epochs = 6 steps, a line per step, an
evaluation per epoch on the images' eval crops); event files are read back with TensorBoard's own reader."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from attncache_cli.main import app
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from typer.testing import CliRunner

from attncache.train import TrainConfig, train
from attncache.train.curves import EVENTS, TRAIN_TAGS

runner = CliRunner()


def config(out: Path, cache, data, **kw) -> TrainConfig:
    base = dict(mode="distill", out=str(out), cache=str(cache), data=str(data), val_data=str(data), epochs=2,
                batch_size=2, workers=0, progress=False, log_every=1, lr=1e-3, warmup_epochs=0.5)
    return TrainConfig(**{**base, **kw})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of every scalar tag, as TensorBoard's viewer reads the run's event files."""
    acc = EventAccumulator(str(run / EVENTS))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def raw_scalars(run: Path) -> list[tuple[str, int, float]]:
    """(tag, step, wall time) of every scalar in every event file, as written (no purge logic applied)."""
    return [(v.tag, e.step, e.wall_time) for path in sorted((run / EVENTS).glob("events.out.tfevents.*"))
            for e in EventFileLoader(str(path)).Load() for v in e.summary.value]


def expected(run: Path) -> dict[str, list[tuple[int, float]]]:
    """The metrics lines as TensorBoard holds them: float32 scalars at the lines' steps."""
    lines = metrics(run)
    want = {tag: [(r["step"], float(np.float32(r[key]))) for r in lines if r["kind"] == "train"]
            for key, tag in TRAIN_TAGS.items()}
    for key in ("val_top1", "val_loss"):
        want[f"val/{key[4:]}"] = [(r["step"], float(np.float32(r[key]))) for r in lines if r["kind"] == "eval"]
    return want


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, folder_fp32_zarr, image_folder) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("curves")
    train(config(root / "run_a", folder_fp32_zarr, image_folder))
    train(config(root / "run_b", folder_fp32_zarr, image_folder, lr=3e-3, seed=1))
    return root / "run_a", root / "run_b"


def test_event_files_hold_the_metrics_lines(two_runs):
    for run in two_runs:
        got, want = scalars(run), expected(run)
        assert set(got) == set(want) and len(want["train/loss"]) == 6 and [s for s, _ in want["val/top1"]] == [3, 6]
        assert got == want  # every tag, step and value (float32, as TensorBoard stores scalars)


def test_a_killed_and_resumed_run_writes_no_step_twice(tmp_path, two_runs, folder_fp32_zarr, image_folder,
                                                       monkeypatch):
    """The hard case for a purge step: the checkpoint at step 3 (--save-every 3) comes before epoch 1's evaluation,
    which is logged (and its event flushed) and then the process dies. The resumed run keeps the 3 train lines,
    evaluates epoch 1 again at step 3 and goes on: every tag has each step once, in the files as written, and equals
    an uninterrupted run's; the events from before the crash keep their wall times."""
    from attncache.train.engine import Engine

    say = Engine._say

    def die_after_the_first_evaluation(self, msg):
        say(self, msg)
        if msg.startswith("epoch 1:"):
            raise RuntimeError("killed")  # no checkpoint, no clean stop: what a SIGKILL leaves

    monkeypatch.setattr(Engine, "_say", die_after_the_first_evaluation)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed"):
        train(config(run, folder_fp32_zarr, image_folder, save_every=3))
    before = {(tag, step): t for tag, step, t in raw_scalars(run)}
    assert ("val/top1", 3) in before  # the evaluation the checkpoint has not seen is in the events
    monkeypatch.setattr(Engine, "_say", say)
    train(config(run, folder_fp32_zarr, image_folder, save_every=3))

    written = raw_scalars(run)
    assert len(written) == len({(tag, step) for tag, step, _ in written})  # no (tag, step) twice on disk
    assert len(list((run / EVENTS).glob("events.out.tfevents.*"))) == 1
    assert scalars(run) == expected(run)
    reference = expected(two_runs[0])
    assert {k: v for k, v in expected(run).items() if k != "train/images_per_s"} == \
        {k: v for k, v in reference.items() if k != "train/images_per_s"}
    assert all(t == before[(tag, step)] for tag, step, t in written if tag.startswith("train/") and step <= 3)


def test_curves_can_be_off_and_training_needs_no_tensorboard(tmp_path, folder_fp32_zarr, image_folder, monkeypatch,
                                                            capsys):
    off = tmp_path / "off"
    train(config(off, folder_fp32_zarr, image_folder, epochs=1, tensorboard=False))
    assert (off / "metrics.jsonl").is_file() and not (off / EVENTS).exists()

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    missing = tmp_path / "missing"
    results = train(config(missing, folder_fp32_zarr, image_folder, epochs=1, progress=True))
    assert results["steps"] == 3 and not (missing / EVENTS).exists()
    assert capsys.readouterr().err.count("tensorboard is not installed: no TensorBoard curves") == 1


def colour_pixels(image: np.ndarray, colour) -> int:
    """Pixels within a small tolerance of a matplotlib colour (lines are antialiased: their cores match)."""
    from matplotlib.colors import to_rgb

    return int((np.abs(image[..., :3] - np.array(to_rgb(colour))).max(axis=-1) < 0.03).sum())


def test_plot_draws_each_run_in_its_own_colour(tmp_path, two_runs):
    import matplotlib.image
    import matplotlib.pyplot as plt

    out = tmp_path / "curves.png"
    result = runner.invoke(app, ["plot", *map(str, two_runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"wrote {out}"
    image = matplotlib.image.imread(str(out))
    first, second = plt.rcParams["axes.prop_cycle"].by_key()["color"][:2]  # what plot gives run 1 and run 2
    half = image.shape[1] // 2
    # Loss, val top-1: a curve of each run in each panel. 400 pixels: more than a legend swatch (under 200), less
    # than the first run's val top-1 (about 750), which the second run's coincides with on this tiny val set (the
    # first run's wider line shows around it).
    for panel in (image[:, :half], image[:, half:]):
        for colour in (first, second):
            assert colour_pixels(panel, colour) > 400, (colour, colour_pixels(panel, colour))


def test_plot_of_a_folder_without_metrics_is_one_line(tmp_path, two_runs):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "curves.png"
    result = runner.invoke(app, ["plot", str(two_runs[0]), str(tmp_path / "empty"), "--out", str(out)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert result.stderr.startswith(f"error: {tmp_path / 'empty'}: no metrics.jsonl")
    assert not out.exists()

"""`attncache viz`: the attention rows drawn are the cache's (or the live teacher's, or the student's) own."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from attncache_cli.main import app
from PIL import Image
from typer.testing import CliRunner

from attncache.errors import AttncacheError
from attncache.extract import extract
from attncache.tools.viz import Panel, attention_rows, figure, query_index, visualize

runner = CliRunner()


def cell_colours(png, grid: int) -> np.ndarray:
    """(grid, grid, 3): the mean RGB (0..1) of the inner half of each patch of a one-cell figure's picture, found
    as the longest runs of rows and of columns that are mostly not white (titles are short runs of thin text)."""
    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64) / 255
    inked = (rgb < 0.97).any(-1)

    def longest_run(share: np.ndarray) -> tuple[int, int]:
        on = np.concatenate([[0], share > 0.5 * share.max(), [0]]).astype(int)
        starts, stops = np.nonzero(np.diff(on) == 1)[0], np.nonzero(np.diff(on) == -1)[0]
        i = int(np.argmax(stops - starts))
        return int(starts[i]), int(stops[i] - starts[i])

    (top, height), (left, width) = longest_run(inked.mean(1)), longest_run(inked.mean(0))
    assert abs(height - width) <= 2 and height > 50, ("not one square cell", height, width)
    step = min(height, width) / grid
    out = np.empty((grid, grid, 3))
    for y in range(grid):
        for x in range(grid):
            box = rgb[int(top + (y + 0.25) * step):int(top + (y + 0.75) * step),
                      int(left + (x + 0.25) * step):int(left + (x + 0.75) * step)]
            out[y, x] = box.reshape(-1, 3).mean(0)
    return out


def test_the_drawn_cell_is_the_chosen_maps_row(tmp_path):
    """Regression (the old tests judged PNGs by size, so a constant or zero map passed): on a plain grey view, the
    cell drawn for layer l, head h (a panel holds the chosen layers' maps, as `visualize` passes them) shows that
    head's row, the attended patch the brightest by far, and a map that
    attends to nothing (all zero) draws every patch alike."""
    grid, prefix = 4, 1
    n = prefix + grid * grid
    maps = torch.full((2, 2, n, n), 0.2 / (n - 1))
    attended = {(0, 0): (0, 0), (0, 1): (3, 0), (1, 0): (1, 2), (1, 1): (2, 3)}  # (layer, head) -> patch (x, y)
    for (layer, head), (x, y) in attended.items():
        maps[layer, head, :, prefix + y * grid + x] = 0.8
    for layer, head in attended:
        png = figure(torch.zeros(3, 32, 32), [Panel("t", maps[[layer]])], [layer], [head], "cls", prefix, grid,
                     [0.5] * 3, [0.5] * 3, "known map", tmp_path / f"{layer}{head}.png")
        brightness = cell_colours(png, grid).mean(-1)
        x, y = attended[layer, head]
        assert np.unravel_index(brightness.argmax(), brightness.shape) == (y, x), brightness.round(2)
        others = np.delete(brightness.ravel(), y * grid + x)
        assert brightness[y, x] > others.max() + 0.3 and np.ptp(others) < 0.02, brightness.round(2)
    png = figure(torch.zeros(3, 32, 32), [Panel("t", maps * 0)], [0], [0], "cls", prefix, grid, [0.5] * 3,
                 [0.5] * 3, "zero map", tmp_path / "zero.png")
    assert np.ptp(cell_colours(png, grid).mean(-1)) < 0.02


def test_rows_are_the_maps_query_row_over_the_patch_grid():
    maps = torch.rand(2, 3, 1 + 1 + 16, 1 + 1 + 16).softmax(-1)  # [CLS] + 1 register + 4x4 patches
    token, patch = query_index("1,2", num_prefix=2, grid=4)
    assert (token, patch) == (2 + 2 * 4 + 1, (1, 2))
    heat = attention_rows(maps, token, num_prefix=2, grid=4)
    expected = maps[:, :, token, 2:].reshape(2, 3, 4, 4)
    expected = expected / expected.amax(dim=(-2, -1), keepdim=True)
    assert heat.shape == (2, 3, 4, 4) and torch.allclose(torch.from_numpy(heat), expected)
    assert query_index("cls", 2, 4) == (0, None)
    for bad in ("4,0", "a", "1"):
        with pytest.raises(AttncacheError, match="`query`"):
            query_index(bad, 2, 4)


def test_viz_of_a_cached_view_a_live_image_and_a_student(tmp_path, tiny_teacher, image_folder, folder_fp32_zarr):
    from attncache.cache import open_cache
    from attncache.train import TrainConfig, train

    png = visualize(tmp_path / "cached.png", cache=str(folder_fp32_zarr), key="bee/b1.png", view=1,
                    data=str(image_folder))
    one = Image.open(png)
    two = Image.open(visualize(tmp_path / "cls_vs_patch.png", cache=str(folder_fp32_zarr), key="bee/b1.png",
                               view=1, data=str(image_folder), query="2,3"))
    assert one.size == two.size and one.tobytes() != two.tobytes()  # another row is drawn
    # the colours are the cache's rows: two queries over the same view differ by alpha x (inferno(row a) -
    # inferno(row b)), each row stretched to the colour map's range as imshow does, the view itself cancelling out
    cache = open_cache(str(folder_fp32_zarr))
    maps = cache.item(cache.row("bee/b1.png", 1)).maps[cache.layers.index(1), 0]
    prefix = cache.teacher.num_prefix_tokens
    heat = {q: maps[t, prefix:] for q, t in (("cls", 0), ("2,3", prefix + 3 * 4 + 2))}
    drawn = {}
    for q in heat:
        heat[q] = ((heat[q] - heat[q].min()) / (heat[q].max() - heat[q].min())).reshape(4, 4).numpy()
        drawn[q] = cell_colours(visualize(tmp_path / f"cell_{q}.png", cache=str(folder_fp32_zarr), key="bee/b1.png",
                                          view=1, data=str(image_folder), layers="1", heads="0", query=q), 4)
    inferno = matplotlib.colormaps["inferno"]
    expected = 0.6 * (inferno(heat["cls"])[..., :3] - inferno(heat["2,3"])[..., :3])
    measured = drawn["cls"] - drawn["2,3"]
    assert np.abs(expected).max() > 0.05 and np.abs(measured - expected).max() < 0.02, \
        (np.abs(expected).max(), np.abs(measured - expected).max())
    small = Image.open(visualize(tmp_path / "small.png", cache=str(folder_fp32_zarr), data=str(image_folder),
                                 layers="1", heads="0-1"))
    assert small.size[0] < one.size[0] and small.size[1] < one.size[1]  # 1 x 2 cells instead of 2 x 4

    run = tmp_path / "run"
    train(TrainConfig(mode="distill", out=str(run), cache=str(folder_fp32_zarr), data=str(image_folder), epochs=1,
                      batch_size=2, workers=0, progress=False))
    result = runner.invoke(app, ["viz", "--cache", str(folder_fp32_zarr), "--data", str(image_folder),
                                 "--checkpoint", str(run), "--out", str(tmp_path / "student.png")])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "student.png").size[0] > one.size[0]  # teacher and student side by side

    live = runner.invoke(app, ["viz", "--image", str(image_folder / "cat" / "c0.jpg"),
                               *tiny_teacher.cli_args()[:6], "--teacher-arg", "patch_size=8", "--teacher-arg",
                               "depth=2", "--teacher-arg", "embed_dim=64", "--teacher-arg", "num_heads=4",
                               "--out", str(tmp_path / "live.png")])
    assert live.exit_code == 0, live.output
    assert Image.open(tmp_path / "live.png").size == one.size


def test_viz_errors_are_one_line(tmp_path, folder_fp32_zarr, folder_fp16_wds, image_folder):
    def fails(match, *args):
        result = runner.invoke(app, ["viz", "--out", str(tmp_path / "x.png"), *args])
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
        assert match in result.stderr
        assert not (tmp_path / "x.png").exists()

    fails("does not embed images: pass --data", "--cache", str(folder_fp32_zarr))
    fails("no sample 'nope'", "--cache", str(folder_fp32_zarr), "--data", str(image_folder), "--key", "nope")
    fails("not both", "--cache", str(folder_fp16_wds), "--image", "x.png")
    fails("--query '9,9'", "--cache", str(folder_fp16_wds), "--query", "9,9")
    fails("--image needs --teacher", "--image", str(image_folder / "cat" / "c0.jpg"))


def test_viz_of_a_cache_with_some_layers_draws_the_layers_it_holds(tmp_path, tiny_teacher, image_folder):
    """A cache of the transferred layers only (`--layers reference`-style): viz draws those by default, and the
    rows drawn are that layer's, not another's."""
    from attncache.cache import open_cache

    cache = tmp_path / "layer1"
    extract(tiny_teacher.config(image_folder, cache, layers="1", codec="fp32"))
    default = Image.open(visualize(tmp_path / "default.png", cache=str(cache), data=str(image_folder)))
    explicit = Image.open(visualize(tmp_path / "explicit.png", cache=str(cache), data=str(image_folder), layers="1"))
    assert default.tobytes() == explicit.tobytes()  # layer 1, the only one held
    item = open_cache(str(cache))[open_cache(str(cache)).sample_at(0)["key"], 0]
    assert item.maps.shape[0] == 1
    with pytest.raises(AttncacheError, match=r"holds layers \[1\], not \[0\]"):
        visualize(tmp_path / "x.png", cache=str(cache), data=str(image_folder), layers="0")

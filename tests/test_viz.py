"""`attncache viz`: the attention rows drawn are the cache's (or the live teacher's, or the student's) own."""

from __future__ import annotations

import pytest
import torch
from attncache_cli.main import app
from PIL import Image
from typer.testing import CliRunner

from attncache.errors import AttncacheError
from attncache.extract import extract
from attncache.tools.viz import attention_rows, query_index, visualize

runner = CliRunner()


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
        with pytest.raises(AttncacheError, match="--query"):
            query_index(bad, 2, 4)


def test_viz_of_a_cached_view_a_live_image_and_a_student(tmp_path, tiny_teacher, image_folder, folder_fp32_zarr):
    from attncache.train import TrainConfig, train

    png = visualize(tmp_path / "cached.png", cache=str(folder_fp32_zarr), key="bee/b1.png", view=1,
                    data=str(image_folder))
    one = Image.open(png)
    two = Image.open(visualize(tmp_path / "cls_vs_patch.png", cache=str(folder_fp32_zarr), key="bee/b1.png",
                               view=1, data=str(image_folder), query="2,3"))
    assert one.size == two.size and one.tobytes() != two.tobytes()  # another row is drawn
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

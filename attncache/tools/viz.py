"""`attncache viz`: where the teacher (and a student) look, as one PNG.

A layer x head grid: each cell is the rendered view with one attention row laid over it, the [CLS] query's (or a
chosen patch token's) weights over the patch tokens, upsampled to the view. The row comes from a cache (decoded
exactly as training reads it) or from a live teacher on an image (timm's eval view); with a trained run, the
student's own attention on the same view is drawn beside the teacher's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import AttncacheError

MAX_CELLS = 24 * 16  # layers x heads in one figure (ViT-H: 32 x 16 would be unreadable; pick --layers)


@dataclass
class Panel:
    title: str
    maps: torch.Tensor  # (L, H, N, N) probabilities


def attention_rows(maps: torch.Tensor, query: int, num_prefix: int, grid: int) -> np.ndarray:
    """(L, H, grid, grid): each head's attention of token `query` over the patch tokens, as an image, each cell
    renormalised to its own maximum (the share of prefix tokens is in the cell's title instead)."""
    rows = maps[:, :, query, num_prefix:].float()
    if rows.shape[-1] != grid * grid:
        raise AttncacheError(f"{rows.shape[-1]} patch tokens do not form a {grid}x{grid} grid")
    rows = rows.reshape(*rows.shape[:2], grid, grid)
    return (rows / rows.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)).numpy()


def query_index(query: str, num_prefix: int, grid: int) -> tuple[int, tuple[int, int] | None]:
    """`cls` -> token 0; `X,Y` -> the patch in column X, row Y (row-major after the prefix tokens)."""
    if query == "cls":
        return 0, None
    try:
        x, y = (int(v) for v in query.split(","))
    except ValueError as exc:
        raise AttncacheError(f"`query` {query!r}: expected cls or a patch X,Y (0..{grid - 1})") from exc
    if not (0 <= x < grid and 0 <= y < grid):
        raise AttncacheError(f"`query` {query!r}: the patch grid is {grid}x{grid}")
    return num_prefix + y * grid + x, (x, y)


def figure(pixels: torch.Tensor, panels: list[Panel], layers: list[int], heads: list[int], query: str,
           num_prefix: int, grid: int, mean, std, title: str, out: str | Path) -> Path:
    """Write the PNG: one layer x head grid per panel, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(layers) * len(heads) * len(panels) > MAX_CELLS:
        raise AttncacheError(f"{len(layers)} layers x {len(heads)} heads x {len(panels)} panels: too many cells "
                             f"for one picture (at most {MAX_CELLS}); choose `layers` / `heads`")
    token, patch = query_index(query, num_prefix, grid)
    image = (pixels * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)).clamp(0, 1)
    image = image.permute(1, 2, 0).numpy()
    size = image.shape[0]
    cols = len(heads) * len(panels)
    fig, axes = plt.subplots(len(layers), cols, figsize=(1.6 * cols, 1.6 * len(layers) + 0.6), squeeze=False)
    for p, panel in enumerate(panels):
        heat = attention_rows(panel.maps, token, num_prefix, grid)
        prefix_share = panel.maps[:, :, token, :num_prefix].sum(-1) if num_prefix else None
        for i, layer in enumerate(layers):
            for j, head in enumerate(heads):
                ax = axes[i][p * len(heads) + j]
                ax.imshow(image)
                ax.imshow(heat[i, head], cmap="inferno", alpha=0.6, extent=(0, size, size, 0),
                          interpolation="nearest" if grid < 8 else "bilinear")
                if patch is not None:
                    cell = size / grid
                    ax.add_patch(plt.Rectangle((patch[0] * cell, patch[1] * cell), cell, cell, fill=False,
                                               edgecolor="cyan", linewidth=1.2))
                label = f"{panel.title} L{layer} H{head}"
                if prefix_share is not None:
                    label += f"\nprefix {100 * float(prefix_share[i, head]):.0f}%"
                ax.set_title(label, fontsize=7)
                ax.axis("off")
    fig.suptitle(title, fontsize=9)
    # leave the title its own strip (about 0.45 inch) above the grid, whatever the number of rows
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def visualize(out: str | Path, *, cache: str | None = None, key: str | None = None, view: int = 0,
              data: str | None = None, image: str | None = None, teacher=None, checkpoint: str | None = None,
              layers: str | None = None, heads: str | None = None, query: str = "cls",
              storage_options: dict | None = None) -> Path:
    """A cached view's teacher attention (`cache` + `key`/`view`, images from `data` unless embedded), or a live
    teacher's on `image` (timm's eval view); with `checkpoint`, the trained student's own attention beside it."""
    from ..teacher import AttentionCapture, parse_layers
    from ..views import render

    if (cache is None) == (image is None):
        raise AttncacheError("pass `cache` (a cached view) or `image` (a live teacher), not both")
    if cache is not None:
        pixels, maps, spec, caption = _cached_view(cache, key, view, data, storage_options)
        chosen = parse_layers(layers, spec.depth) if layers else list(maps[1])  # default: the layers it holds
        missing = [i for i in chosen if i not in maps[1]]
        if missing:
            raise AttncacheError(f"`cache` {cache}: holds layers {maps[1]}, not {missing}")
        teacher_maps = maps[0][[maps[1].index(i) for i in chosen]]
        if teacher_maps.shape[-2] == 1 and query != "cls":
            raise AttncacheError(f"`cache` {cache}: keeps only the [CLS] query rows; use `query` cls")
    else:
        from ..sources import open_image
        from ..views import ViewPolicy

        if teacher is None or teacher.name is None:
            raise AttncacheError("`image` needs `teacher.name` (and `teacher.weights`, or hub weights)")
        model, spec = teacher.build()
        data_bytes = _read(image)
        img = open_image(data_bytes, image)
        v = ViewPolicy(split="val", crop_pct=spec.crop_pct).draw("image", img.width, img.height, spec.image_size)[0]
        pixels = render(img, v, spec.image_size, spec.interpolation, spec.mean, spec.std)
        chosen = parse_layers(layers or "all", spec.depth)
        with AttentionCapture(model, chosen, "probs") as capture:
            teacher_maps = capture(pixels[None])[0]
        caption = f"{spec.model} on {Path(image).name} (timm eval view)"
    head_list = _heads(heads, spec.num_heads)
    panels = [Panel("teacher", teacher_maps)]
    if checkpoint is not None:
        panels.append(Panel("student", _student_maps(checkpoint, pixels, chosen, spec)))
    grid = spec.image_size // spec.patch_size
    return figure(pixels, panels, chosen, head_list, query, spec.num_prefix_tokens, grid, spec.mean, spec.std,
                  f"{caption} - query {query}", out)


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise AttncacheError(f"`image` {path}: cannot read ({exc.strerror})") from exc


def _heads(spec: str | None, num_heads: int) -> list[int]:
    if spec is None:
        return list(range(num_heads))
    from ..teacher import parse_layers

    try:
        return parse_layers(spec, num_heads)
    except AttncacheError as exc:
        raise AttncacheError(str(exc).replace("`layers`", "`heads`").replace("layer", "head")) from exc


def _cached_view(root: str, key: str | None, view: int, data: str | None, storage_options: dict | None):
    from ..cache import open_cache
    from ..sources import open_image, open_source
    from ..views import render

    cache = open_cache(root, storage_options)
    if key is None:
        key = cache.sample_at(0)["key"]
    try:
        row = cache.row(key, view)
    except KeyError as exc:
        raise AttncacheError(str(exc.args[0])) from exc
    item = cache.item(row)
    maps = item.maps if cache.decodes_to == "probs" else item.maps.softmax(-1)
    embedded = cache.manifest["store"]["embed_images"]
    source = open_source(data, "train") if data else None
    if not embedded and source is None:
        raise AttncacheError(f"`cache` {root} does not embed images: pass `data`")

    def image_of(k: str):
        index = cache.row(k, 0)
        blob = cache.reader.read_images([index])[0] if embedded else source.read_key(k)
        return open_image(blob, k)

    t = cache.teacher
    v = item.view
    partner = image_of(v.mix.partner) if v.mix is not None else None
    pixels = render(image_of(key), v, t.image_size, t.interpolation, t.mean, t.std, partner=partner)
    caption = f"{t.model}: {key} view {view} ({cache.root})"
    return pixels, (maps, list(cache.layers)), t, caption


def _student_maps(checkpoint: str, pixels: torch.Tensor, layers: list[int], teacher) -> torch.Tensor:
    """The trained student's own attention probabilities at `layers` (a copy student's too: what its own q/k
    would attend to, which copy mode never trains)."""
    from ..eval import TrainedStudent
    from ..train.student import student_forward

    student = TrainedStudent(checkpoint, "model", "cpu")
    if student.teacher.image_size != teacher.image_size or student.teacher.num_heads != teacher.num_heads:
        raise AttncacheError(f"`checkpoint` {checkpoint}: its student does not see this teacher's views")
    with torch.no_grad():
        _, recorded = student_forward(student.model, pixels[None], layers, "record")
    return torch.stack([r[0].softmax(-1) for r in recorded])

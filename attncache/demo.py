"""`make demo`: the main job end to end on the embedded demo set, offline, in about a minute on a CPU.

tiny teacher (saved to a local safetensors file) -> extract a train cache (zarr, 2 views per image) and a val cache
(webdataset, images embedded) -> inspect -> verify -> replay one cached view through the live teacher.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from .cache import open_cache
from .capture import AttentionCapture
from .data import open_image, open_source
from .extract import ExtractConfig, extract
from .teachers import build_teacher
from .verify import verify_cache
from .views import render


def run_demo(out: str | Path) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "demo_teacher.safetensors"
    model, _ = build_teacher("demo", pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))

    common = dict(teacher="demo", data="demo", weights=str(weights), batch_size=32)
    train = extract(ExtractConfig(**common, out=str(out / "train_cache"), views=2, split="train"))
    val = extract(ExtractConfig(**common, out=str(out / "val_cache"), split="val", format="wds",
                                embed_images=True))
    results = {}
    for name in ("train_cache", "val_cache"):
        cache = open_cache(str(out / name))
        verify_cache(str(out / name))
        results[name] = cache.summary()
        print(f"\n== attncache inspect {out / name}  (verify: ok)")
        for k, v in results[name].items():
            print(f"  {k:20s} {v:,.2f}" if isinstance(v, float) else f"  {k:20s} {v}")

    # The promise of a cache: a stored view replayed with render() gives the live teacher's maps.
    cache = open_cache(str(out / "train_cache"))
    item = cache["triangle/0003.png", 1]
    source = open_source("demo")
    index = next(i for i, s in enumerate(cache.samples) if s["key"] == item.key)
    data = dict(source.iter_bytes([index]))[index]
    t = cache.teacher
    x = render(open_image(data, item.key), item.view, t.image_size, t.interpolation, t.mean, t.std)
    live = AttentionCapture(model, cache.layers, cache.payload)(x[None])[0]
    err = (live - item.maps).abs().max().item()
    print(f"\nreplay of {item.key} view 1 {item.view.to_json()}: max |cached - live teacher| = {err:.2e} (fp16)")
    results["replay_max_abs_error"] = err
    (out / "demo_results.json").write_text(json.dumps(results, indent=2))
    assert err < 1e-3 and train["store"]["records"] == 128 and val["store"]["records"] == 32
    return results

"""Cache size of K views per image, plain (crop + flip) vs the reference recipe's augmented and mixed views.

    python benchmarks/augmented_views_size.py --teacher vit_small_patch14_dinov2 --image-size 224 \
        --weights ~/.cache/attncache/vit_small_patch14_dinov2_imgfocus.safetensors --data /tmp/real/photos \
        --out /tmp/aug_size

Every cache is a real `attncache extract` (zarr, all layers); sizes are the files on disk, so they include what
the views cost in views.jsonl (RandAugment ops, erasing keys, mixing partners) beside the shards.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from attncache.cache import open_cache
from attncache.extract import extract
from attncache.recipes import extract_config
from attncache.teacher import TeacherOptions


def cache_bytes(root: Path) -> dict:
    files = [p for p in root.rglob("*") if p.is_file()]
    views = (root / "views.jsonl").stat().st_size
    return {"total": sum(p.stat().st_size for p in files), "views_jsonl": views,
            "shards": open_cache(str(root)).summary()["shard_bytes"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="demo")
    p.add_argument("--weights", default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--data", default="demo:8")
    p.add_argument("--codec", default="fp16")
    p.add_argument("--views", default="1,2,4")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    teacher = TeacherOptions(args.teacher, weights=args.weights, pretrained=False, image_size=args.image_size)
    out = Path(args.out)
    rows = []
    for k in [int(v) for v in args.views.split(",")]:
        for recipe in (None, "at-copy"):
            root = out / f"{recipe or 'plain'}_k{k}"
            shutil.rmtree(root, ignore_errors=True)
            m = extract(extract_config(recipe, teacher=teacher, data=args.data, out=str(root), views=k,
                                       codec=args.codec, limit=args.limit, batch_size=8, progress=False))
            sizes = cache_bytes(root)
            records = m["store"]["records"]
            rows.append({"views": k, "recipe": recipe or "plain", "records": records, **sizes,
                         "shard_bytes_per_view": sizes["shards"] / records,
                         "views_jsonl_bytes_per_view": sizes["views_jsonl"] / records})
    base = {r["recipe"]: r["total"] for r in rows if r["views"] == min(x["views"] for x in rows)}
    print(f"{'views':>5} {'views':>8} {'records':>7} {'total MB':>9} {'x K=1 plain':>11} {'shard B/view':>13} "
          f"{'views.jsonl B/view':>18}")
    for r in rows:
        print(f"{r['views']:>5} {r['recipe']:>8} {r['records']:>7} {r['total'] / 1e6:>9.2f} "
              f"{r['total'] / base['plain']:>11.2f} {r['shard_bytes_per_view']:>13,.0f} "
              f"{r['views_jsonl_bytes_per_view']:>18,.0f}")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

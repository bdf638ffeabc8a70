"""Lossless fp16 map compression on a real teacher: ratio vs raw fp16 and single-core speed per compressor setting.

    python benchmarks/fp16_compression.py --weights ~/.cache/attncache/vit_small_patch14_dinov2_imgfocus.safetensors \
        --data /tmp/real/photos --views 2

Maps come from the same capture and views as `attncache extract`; each setting compresses every record separately
(as both stores do) with numcodecs' Blosc on one thread.
"""

from __future__ import annotations

import argparse
import json
import time

import numcodecs
import numpy as np
import torch

from attncache.sources import open_image, open_source
from attncache.teacher import AttentionCapture, TeacherOptions, parse_layers
from attncache.views import ViewPolicy, render

_BYTE, _BIT, _NO = numcodecs.Blosc.SHUFFLE, numcodecs.Blosc.BITSHUFFLE, numcodecs.Blosc.NOSHUFFLE
MIB = 1 << 20
# (cname, clevel, shuffle, blocksize; 0 = blosc chooses)
SETTINGS = [("zstd", 1, _BYTE, 0), ("zstd", 3, _BYTE, 0), ("zstd", 5, _BYTE, 0), ("zstd", 9, _BYTE, 0),
            ("zstd", 3, _BIT, 0), ("zstd", 3, _NO, 0), ("lz4", 5, _BYTE, 0), ("blosclz", 5, _BYTE, 0),
            ("zstd", 1, _BYTE, MIB), ("zstd", 2, _BYTE, MIB), ("zstd", 3, _BIT, MIB)]


def capture_maps(args) -> np.ndarray:
    model, spec = TeacherOptions(args.teacher, weights=args.weights, pretrained=False,
                                 image_size=args.image_size).build()
    capture = AttentionCapture(model, parse_layers("all", spec.depth), "probs")
    source = open_source(args.data, limit=args.limit)
    samples = source.scan()
    policy = ViewPolicy(views_per_image=args.views, seed=0)
    maps = []
    for i, data in source.iter_bytes(range(len(samples))):
        s = samples[i]
        image = open_image(data, s.key)
        views = policy.draw(s.key, s.width, s.height, spec.image_size)
        x = torch.stack([render(image, v, spec.image_size, spec.interpolation, spec.mean, spec.std) for v in views])
        maps.append(capture(x).half().numpy())
    return np.concatenate(maps)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="vit_small_patch14_dinov2")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--weights", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--limit", type=int, default=None)
    args = p.parse_args()
    maps = capture_maps(args)
    numcodecs.blosc.use_threads = False
    raw = maps[0].nbytes
    rows = []
    for cname, clevel, shuffle, blocksize in SETTINGS:
        codec = numcodecs.Blosc(cname=cname, clevel=clevel, shuffle=shuffle, blocksize=blocksize)
        start = time.perf_counter()
        encoded = [codec.encode(np.ascontiguousarray(m)) for m in maps]
        enc_s = time.perf_counter() - start
        start = time.perf_counter()
        for e in encoded:
            codec.decode(e)
        dec_s = time.perf_counter() - start
        stored = sum(len(e) for e in encoded) / len(encoded)
        rows.append({"cname": cname, "clevel": clevel, "shuffle": {0: "no", 1: "byte", 2: "bit"}[shuffle],
                     "blocksize": blocksize,
                     "bytes_per_view": int(stored), "ratio": round(raw / stored, 3),
                     "encode_MBps_1core": round(raw * len(maps) / enc_s / 1e6, 1),
                     "decode_MBps_1core": round(raw * len(maps) / dec_s / 1e6, 1)})
    print(json.dumps({"views": len(maps), "raw_fp16_bytes_per_view": raw, "map_shape": list(maps.shape[1:]),
                      "settings": rows}, indent=2))


if __name__ == "__main__":
    main()

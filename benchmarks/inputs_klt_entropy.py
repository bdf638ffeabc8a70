#!/usr/bin/env python
"""How close blosc gets to the entropy of an `inputs_klt` cache's codes, and what other layouts would store.

For every record of CACHE: the stored bytes, the same codes re-compressed as two's-complement int32 (the layout of
the first `inputs_klt` caches) and as zigzag uint32 under other blosc settings, and three entropy estimates:
- order-0 entropy per (layer, coefficient): each coefficient's own empirical distribution of codes over the
  cache (a bound no coder reaches: the models are fitted to the very codes they code, and cost nothing);
- a discretised Laplacian per coefficient with its mean |code| (a model a coder could use);
- the order-0 bound of the residual after predicting a patch's code from its left neighbour (DPCM), per
  coefficient whichever is smaller.

    python benchmarks/inputs_klt_entropy.py CACHE [--records 40]
"""

from __future__ import annotations

import argparse
import json
import math

import numcodecs
import numpy as np
import torch

from attncache import open_cache
from attncache.codecs.inputs_klt import unzigzag, zigzag


def entropy_bits(values: np.ndarray) -> float:
    """Total bits of `values` under their own empirical distribution."""
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum())


def laplace_bits(values: np.ndarray) -> float:
    """Total bits under a discretised Laplacian P(k) ∝ θ^|k| with the values' mean |k|."""
    theta = max(math.exp(-1 / max(float(np.abs(values).mean()), 1e-3)), 1e-300)  # all zeros: P(0) ≈ 1
    k, counts = np.unique(np.abs(values), return_counts=True)
    log_p = math.log2((1 - theta) / (1 + theta)) + k * math.log2(theta)
    return float(-(counts * log_p).sum())


def left_residual(values: np.ndarray, tokens: int) -> np.ndarray | None:
    """(views, tokens) codes -> the [CLS]/register codes and each patch's code minus its left neighbour's, where
    the patches form a square grid after the leading tokens."""
    side = math.isqrt(tokens - 1)
    if side * side != tokens - 1:
        return None
    grid = values[:, 1:].reshape(len(values), side, side)
    return np.concatenate([values[:, 0], grid[:, :, 0].ravel(), (grid[:, :, 1:] - grid[:, :, :-1]).ravel()])


def blosc_bytes(arrays: np.ndarray, **settings) -> int:
    codec = numcodecs.Blosc(cname="zstd", **{"clevel": 1, "shuffle": 2, "blocksize": 1 << 20, **settings})
    return sum(len(codec.encode(np.ascontiguousarray(a))) for a in arrays)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cache")
    p.add_argument("--records", type=int, default=40)
    args = p.parse_args()

    cache = open_cache(args.cache)
    if cache.manifest["codec"]["name"] != "inputs_klt":
        raise SystemExit("an inputs_klt cache, please")
    rows = list(range(min(args.records, len(cache))))
    stored = cache.reader.read(rows)["z"]  # (V, L, D, N)
    codes = unzigzag(torch.from_numpy(stored.view(np.int32))).numpy() if stored.dtype == np.uint32 else stored
    zz = zigzag(torch.from_numpy(codes)).numpy().view(np.uint32)
    views, layers, dim, tokens = codes.shape

    order0 = laplace = dpcm = 0.0
    for layer in range(layers):
        for d in range(dim):
            values = codes[:, layer, d, :]
            bits = entropy_bits(values)
            order0 += bits
            laplace += laplace_bits(values)
            residual = left_residual(values, tokens)
            dpcm += bits if residual is None else min(bits, entropy_bits(residual))

    per_view = {
        "stored": sum(len(cache.reader.stored("z", r)) for r in rows) / views,
        "twos_complement_int32": blosc_bytes(codes.astype(np.int32)) / views,
        "zigzag_uint32": blosc_bytes(zz) / views,
        "zigzag_uint32_clevel5": blosc_bytes(zz, clevel=5) / views,
        "zigzag_uint32_block_4MiB": blosc_bytes(zz, blocksize=4 << 20) / views,
        "order0_entropy_per_coefficient": order0 / 8 / views,
        "laplacian_per_coefficient": laplace / 8 / views,
        "left_neighbour_dpcm_bound": dpcm / 8 / views,
    }
    if np.abs(codes).max() < 1 << 15:
        per_view["zigzag_uint16"] = blosc_bytes(zz.astype(np.uint16), typesize=2) / views
    raw = layers * cache.teacher.num_heads * tokens * tokens * 2
    print(json.dumps({"records": views, "step": cache.codec.params["step"], "max_abs_code": int(np.abs(codes).max()),
                      "bytes_per_view": {k: round(v) for k, v in per_view.items()},
                      "ratio_vs_raw_fp16": {k: round(raw / v, 2) for k, v in per_view.items()}}, indent=2))


if __name__ == "__main__":
    main()

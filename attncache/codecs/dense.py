"""Dense codecs: the maps as they are, in fp16 (the lossless-enough baseline) or fp32 (exact), blosc-compressed.

Blosc with zstd and byte shuffle groups the high and low bytes of the fp16 values, which compress very differently
(measured on real DINOv2-S maps: high bytes 5.0 bits/byte of order-0 entropy, low bytes 7.9). Default settings from
`benchmarks/fp16_compression.py` on those maps: zstd level 1 with 1 MiB blocks gives 1.31x at ~400 MB/s per core;
level 3 with blosc's automatic blocks gave 1.22x at 136 MB/s, level 5 1.33x at 54 MB/s (docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Codec, FieldSpec, blosc, register_codec

_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


class DenseCodec(Codec):
    dtype: str = ""

    def __init__(self, cname: str = "zstd", clevel: int = 1, shuffle: str = "shuffle", blocksize: int = 1 << 20):
        if shuffle not in _SHUFFLE:
            raise ValueError(f"shuffle must be one of {sorted(_SHUFFLE)}")
        super().__init__(cname=cname, clevel=int(clevel), shuffle=shuffle, blocksize=int(blocksize))

    def fields(self, shape):
        return {"maps": FieldSpec(shape.map_shape, self.dtype)}

    def compressor(self) -> dict:
        p = self.params
        return blosc(p["cname"], p["clevel"], _SHUFFLE[p["shuffle"]], p["blocksize"], np.dtype(self.dtype).itemsize)

    def encode(self, maps: torch.Tensor, payload: str) -> dict[str, np.ndarray]:
        torch_dtype = getattr(torch, self.dtype)
        return {"maps": maps.detach().to(torch_dtype).cpu().numpy()}

    def decode(self, fields):
        return fields["maps"].float()


@register_codec
class Fp16Codec(DenseCodec):
    name = "fp16"
    dtype = "float16"
    lossless = False  # exact for what a student consumes in practice; relative error <= 2^-11


@register_codec
class Fp32Codec(DenseCodec):
    name = "fp32"
    dtype = "float32"
    lossless = True


@register_codec
class ClsCodec(DenseCodec):
    """Only the [CLS]-query row of each map, fp16 (L, H, N): all GTA needs, N times smaller than `fp16`.
    Its default payload is logits (what GTA regularises); copy and distill, which need whole maps, refuse it."""

    name = "cls"
    dtype = "float16"
    query_rows = "cls"
    payloads = ("logits", "probs")

    def fields(self, shape):
        return {"cls": FieldSpec((shape.layers, shape.heads, shape.tokens), self.dtype)}

    def encode(self, maps, payload):
        return {"cls": maps[:, :, :, 0, :].detach().to(torch.float16).cpu().numpy()}

    def decode(self, fields):
        return fields["cls"].float().unsqueeze(-2)

"""Codec interface and registry.

A codec turns a batch of captured attention maps (B, L, H, N, N) into named fields of fixed per-record shape and
dtype, plus a numcodecs compressor applied to each record's raw little-endian bytes. Encoding of the lossy part
runs on the extraction device; decoding runs on the training device from the compact bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import AttncacheError


@dataclass(frozen=True)
class FieldSpec:
    """One stored array per record: shape (without the record axis) and numpy dtype name."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype}


class Codec:
    name: str = ""
    lossless: bool = False
    query_rows: str = "all"  # "all": decode gives (B, L, H, N, N); "cls": only the [CLS]-query row, (B, L, H, 1, N)

    def __init__(self, **params):
        self.params = params

    def fields(self, map_shape: tuple[int, int, int, int]) -> dict[str, FieldSpec]:
        """Stored fields for maps of shape (L, H, N, N)."""
        raise NotImplementedError

    def compressor(self) -> dict:
        """numcodecs compressor config applied to each record's field bytes (JSON, recorded in the manifest)."""
        raise NotImplementedError

    def encode(self, maps: torch.Tensor) -> dict[str, np.ndarray]:
        """(B, L, H, N, N) float maps on any device -> {field: (B, *shape) numpy array} on the CPU."""
        raise NotImplementedError

    def decode(self, fields: dict[str, torch.Tensor]) -> torch.Tensor:
        """{field: (B, *shape) tensor on the target device} -> (B, L, H, Q, N) float32 maps on that device
        (Q = N, or 1 for codecs that keep only the [CLS]-query rows)."""
        raise NotImplementedError

    def to_json(self) -> dict:
        return {"name": self.name, "params": dict(self.params), "compressor": self.compressor()}


CODECS: dict[str, type[Codec]] = {}


def register_codec(cls: type[Codec]) -> type[Codec]:
    CODECS[cls.name] = cls
    return cls


def get_codec(name: str, **params) -> Codec:
    if name not in CODECS:
        raise AttncacheError(f"unknown codec {name!r}: available {sorted(CODECS)}")
    try:
        return CODECS[name](**params)
    except (TypeError, ValueError) as exc:
        raise AttncacheError(f"codec {name!r}: bad parameters {params} ({exc})") from exc

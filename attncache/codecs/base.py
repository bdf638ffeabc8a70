"""Codec interface and registry.

A codec turns what the teacher capture gives for a batch (maps (B, L, H, N, N), or q and k (B, L, 2, H, N, d) for
the `qk` payload) into named fields of fixed per-record shape and dtype, plus a numcodecs compressor applied to each
record's raw little-endian bytes. Encoding of the lossy part runs on the extraction device; decoding runs on the
training device from the compact bytes and gives (B, L, H, Q, N) maps: probabilities or logits (`decodes_to`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import AttncacheError
from ..teacher.capture import CaptureShape


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
    payloads: tuple[str, ...] = ("probs", "logits")  # capture payloads it encodes; the first is the default
    needs_projections: bool = False  # decoding needs the teacher's q/k projections (the cache carries them)
    needs_basis: bool = False  # coding needs a basis fitted at extraction (the cache carries it; inputs_klt)

    def __init__(self, **params):
        self.params = params

    def decodes_to(self, payload: str) -> str:
        """What `decode` gives for a cache of this capture payload: "probs" or "logits"."""
        return payload

    def fields(self, shape: CaptureShape) -> dict[str, FieldSpec]:
        """Stored fields per record."""
        raise NotImplementedError

    def readable_fields(self, shape: CaptureShape) -> list[dict[str, FieldSpec]]:
        """Every field layout this codec decodes: what it writes now, first, then older layouts it still reads."""
        return [self.fields(shape)]

    def compressor(self) -> dict:
        """numcodecs compressor config applied to each record's field bytes (JSON, recorded in the manifest)."""
        raise NotImplementedError

    def encode(self, captured: torch.Tensor, payload: str) -> dict[str, np.ndarray]:
        """The capture's float tensor for a batch of `payload`, on any device -> {field: (B, *shape) numpy array}
        on the CPU (only the compact result leaves the device)."""
        raise NotImplementedError

    def decode(self, fields: dict[str, torch.Tensor]) -> torch.Tensor:
        """{field: (B, *shape) tensor on the target device} -> (B, L, H, Q, N) float32 maps on that device
        (Q = N, or 1 for codecs that keep only the [CLS]-query rows), of kind `decodes_to(payload)`."""
        raise NotImplementedError

    def to_json(self) -> dict:
        return {"name": self.name, "params": dict(self.params), "compressor": self.compressor()}


CODECS: dict[str, type[Codec]] = {}


def register_codec(cls: type[Codec]) -> type[Codec]:
    CODECS[cls.name] = cls
    return cls


def blosc(cname: str = "zstd", clevel: int = 1, shuffle: int = 1, blocksize: int = 1 << 20, typesize: int = 1) -> dict:
    """The numcodecs blosc config every codec stores with (one bounded decompression path for readers)."""
    return {"id": "blosc", "cname": cname, "clevel": clevel, "shuffle": shuffle, "blocksize": blocksize,
            "typesize": typesize}


def get_codec(name: str, **params) -> Codec:
    if name not in CODECS:
        raise AttncacheError(f"unknown codec {name!r}: available {sorted(CODECS)}")
    try:
        return CODECS[name](**params)
    except (TypeError, ValueError) as exc:
        raise AttncacheError(f"codec {name!r}: bad parameters {params} ({exc})") from exc

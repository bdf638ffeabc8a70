"""Codec interface and registry.

A codec turns what the teacher capture gives for a batch (maps (B, L, H, N, N), or q and k (B, L, 2, H, N, d) for
the `qk` payload) into named fields of fixed per-record shape and dtype, plus a numcodecs compressor applied to each
record's raw little-endian bytes. Encoding of the lossy part runs on the extraction device; decoding runs on the
training device from the compact bytes and gives (B, L, H, Q, N) maps: probabilities or logits (`decodes_to`).

Some codecs need more than the records: the teacher's q/k projections, a basis fitted to the data. A cache carries
each such side file once, beside the shards, and its manifest names it with its size and sha256 like every other
file. A codec declares them (`side_files`); extraction builds their bytes, the reader binds them at open, and
nothing else needs to know: copying or verifying a cache moves and hashes the files its manifest names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

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


@dataclass
class SideFileInputs:
    """What extraction builds side files from: the teacher, its captured layers, and calibration views."""

    model: nn.Module
    layers: list[int]
    # count -> the codec payload's capture (V, ...) of `count` views spread evenly over the cache's records (fewer
    # when it has fewer), on the CPU, rendered and captured exactly as its shards are
    calibration: Callable[[int], torch.Tensor]


@dataclass(frozen=True)
class SideFile:
    """A file a codec's caches carry once (docs/format.md): how it is built at extraction, read back at open, and
    how big it is before there is one (`attncache plan`)."""

    name: str  # its path in the cache, and its key in the manifest's `files`
    attr: str  # the codec attribute it is bound to
    build: Callable[[Codec, SideFileInputs], bytes]  # canonical bytes: the same inputs give the same file
    load: Callable[[bytes, CaptureShape, str], object]  # parsed and checked against the geometry; str: its location
    nbytes: Callable[[CaptureShape], int]  # the estimate: its tensors' bytes, without the small header
    # fitted to the data (not a function of the teacher alone): fitted once, by one process, and a resumed
    # extraction reuses the recorded bytes (a refit on another device could differ in the last bits, and the shards
    # already written were coded in the recorded one)
    fitted: bool = False


class Codec:
    name: str = ""
    lossless: bool = False
    query_rows: str = "all"  # "all": decode gives (B, L, H, N, N); "cls": only the [CLS]-query row, (B, L, H, 1, N)
    payloads: tuple[str, ...] = ("probs", "logits")  # capture payloads it encodes; the first is the default
    side_files: tuple[SideFile, ...] = ()  # what encoding or decoding needs besides the records, in binding order

    def __init__(self, **params):
        self.params = params
        for side in self.side_files:
            setattr(self, side.attr, None)
        self._on: dict[str, object] = {}  # what is made from the bound files, per device, on first use

    def bind(self, files: Mapping[str, bytes], shape: CaptureShape, where: Callable[[str], str] = str) -> None:
        """Parse, check and hold each side file from its bytes (`files` by name): extraction binds those it built,
        a cache those its manifest names. `where(name)` is how an error names the file (a cache: its URL)."""
        for side in self.side_files:
            setattr(self, side.attr, side.load(files[side.name], shape, where(side.name)))
        self._on = {}

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


def side_file_names() -> set[str]:
    """Every side file a registered codec's caches can carry."""
    return {side.name for cls in CODECS.values() for side in cls.side_files}


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

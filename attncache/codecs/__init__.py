"""Codec registry: `get_codec(name, **params)`; every codec module registers itself on import."""

from . import dense, qk, quantized  # noqa: F401  (register fp16, fp32, cls, qk, lowrank, logq, sqrtq)
from .base import CODECS, CaptureShape, Codec, FieldSpec, get_codec, register_codec

__all__ = ["CODECS", "CaptureShape", "Codec", "FieldSpec", "get_codec", "register_codec"]

"""Codec registry: `get_codec(name, **params)`; every codec module registers itself on import."""

from . import dense, inputs, qk, quantized  # noqa: F401  (fp16, fp32, cls, qk, lowrank, logq, sqrtq, inputs)
from .base import CODECS, CaptureShape, Codec, FieldSpec, get_codec, register_codec

__all__ = ["CODECS", "CaptureShape", "Codec", "FieldSpec", "get_codec", "register_codec"]

"""Codec registry: `get_codec(name, **params)`; every codec module registers itself on import."""

# fp16, fp32, cls, qk, lowrank, logq, sqrtq, inputs, inputs_klt
from . import dense, inputs, inputs_klt, qk, quantized  # noqa: F401
from .base import CODECS, CaptureShape, Codec, FieldSpec, get_codec, register_codec

__all__ = ["CODECS", "CaptureShape", "Codec", "FieldSpec", "get_codec", "register_codec"]

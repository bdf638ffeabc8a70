"""Codec registry: `get_codec(name, **params)`; every codec module registers itself on import."""

from . import dense  # noqa: F401  (registers fp16, fp32)
from .base import CODECS, Codec, FieldSpec, get_codec, register_codec

__all__ = ["CODECS", "Codec", "FieldSpec", "get_codec", "register_codec"]

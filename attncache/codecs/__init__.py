"""Codec registry: `get_codec(name, **params)`; every codec module registers itself on import."""

# fp16, fp32, cls, qk, lowrank, logq, sqrtq, inputs, inputs_klt
# CaptureShape, the argument of `codec.fields(shape)`, is the teacher's (teacher/capture.py): re-exported here
from ..teacher.capture import CaptureShape
from . import dense, inputs, inputs_klt, qk, quantized  # noqa: F401
from .base import CODECS, Codec, FieldSpec, SideFile, SideFileInputs, get_codec, register_codec, side_file_names

__all__ = ["CODECS", "CaptureShape", "Codec", "FieldSpec", "SideFile", "SideFileInputs", "get_codec", "register_codec",
           "side_file_names"]

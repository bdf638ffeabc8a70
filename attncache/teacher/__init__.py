"""The frozen teacher: registry and options (registry.py), weight files (weights.py), fast-failing hub access
(hub.py), and attention capture (capture.py)."""

from .capture import PAYLOADS, AttentionCapture, CaptureShape, parse_layers
from .drop_path import drop_path_masks
from .registry import (
    DEMO_TEACHER,
    TEACHER_ALIASES,
    TeacherOptions,
    TeacherSpec,
    build_teacher,
    check_standard_vit,
    geometry,
    geometry_differences,
    parse_kwargs,
    resolve_name,
)
from .weights import load_state, read_state_dict, state_dict_sha256

__all__ = ["DEMO_TEACHER", "PAYLOADS", "TEACHER_ALIASES", "AttentionCapture", "CaptureShape", "TeacherOptions",
           "TeacherSpec", "build_teacher", "check_standard_vit", "drop_path_masks", "geometry", "geometry_differences",
           "load_state", "parse_kwargs", "parse_layers", "read_state_dict", "resolve_name", "state_dict_sha256"]

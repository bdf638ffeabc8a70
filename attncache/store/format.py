"""The cache format, defined once: file layout, manifest schema and validation, integrity helpers.

docs/format.md is the human-readable spec of what this module writes and accepts. A cache from another lab is
untrusted input: the manifest is validated (types, bounds, relative paths without escapes) before any shard is read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path

from ..errors import CacheFormatError

FORMAT_NAME = "attncache"
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
SAMPLES = "samples.jsonl"  # one JSON object per image, in sample-index order
VIEWS = "views.jsonl"  # one JSON object per record, in row order
PROGRESS_DIR = ".progress"  # resume state of an unfinished extraction; never part of a finished cache
PLAN = f"{PROGRESS_DIR}/plan.json"

STORE_FORMATS = ("zarr", "wds")

# Bounds on what a manifest may declare: a hostile manifest must not make us allocate or decompress without limit.
MAX_TOKENS = 8192
MAX_LAYERS = 256
MAX_HEADS = 256
MAX_RECORD_BYTES = 2**33  # 8 GiB per record field
_SAFE_PATH = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


def row_of(sample_index: int, view: int, num_samples: int) -> int:
    """Records are view-major: all images' view 0, then view 1, ... so one epoch can stream one view's shards."""
    return view * num_samples + sample_index


def sample_and_view(row: int, num_samples: int) -> tuple[int, int]:
    view, sample_index = divmod(row, num_samples)
    return sample_index, view


def safe_relpath(path: str, where: str = "manifest") -> str:
    """A relative path inside the cache: no absolute paths, no '..', no odd characters."""
    if not isinstance(path, str) or not _SAFE_PATH.match(path) or any(p in ("..", ".") for p in path.split("/")):
        raise CacheFormatError(f"{where}: unsafe file path {path!r}")
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(root: Path, relpath: str) -> dict:
    path = root / relpath
    return {"path": relpath, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def file_intact(root: Path, entry: dict) -> bool:
    """Does the file still have the size and sha256 recorded in `entry` ({path, bytes, sha256})?"""
    path = root / entry["path"]
    return path.is_file() and path.stat().st_size == entry["bytes"] and sha256_file(path) == entry["sha256"]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def atomic_write_json(path: Path, obj, indent: int | None = 2) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=indent, sort_keys=False) + "\n").encode())


def write_jsonl(path: Path, rows) -> None:
    atomic_write_bytes(path, b"".join(canonical_json(r) + b"\n" for r in rows))


def read_jsonl(data: bytes, where: str) -> list[dict]:
    try:
        return [json.loads(line) for line in data.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise CacheFormatError(f"{where}: invalid JSON line ({exc})") from exc


def dataset_fingerprint(samples: list[dict]) -> str:
    """sha256 over `key \\t sha256 \\n` of every image, in sample order."""
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s['key']}\t{s['sha256']}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Manifest validation


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise CacheFormatError(f"manifest: {msg}")


def _int_in(d: dict, key: str, lo: int, hi: int, where: str) -> int:
    v = d.get(key)
    _require(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi,
             f"{where}.{key} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def validate_manifest(m: dict) -> dict:
    """Check structure, types and bounds of a manifest; returns it unchanged.

    Raises CacheFormatError naming the field at fault.
    """
    _require(isinstance(m, dict), "not a JSON object")
    _require(m.get("format") == FORMAT_NAME, f"format must be {FORMAT_NAME!r}, got {m.get('format')!r}")
    _require(m.get("version") == FORMAT_VERSION,
             f"version {m.get('version')!r} is not supported (this attncache reads version {FORMAT_VERSION})")
    for section in ("teacher", "capture", "codec", "views", "dataset", "store", "files"):
        _require(isinstance(m.get(section), dict), f"missing section {section!r}")
    t = m["teacher"]
    _require(isinstance(t.get("model"), str), "teacher.model must be a string")
    depth = _int_in(t, "depth", 1, MAX_LAYERS, "teacher")
    _int_in(t, "num_heads", 1, MAX_HEADS, "teacher")
    _int_in(t, "num_tokens", 2, MAX_TOKENS, "teacher")
    _int_in(t, "image_size", 1, 65536, "teacher")
    c = m["capture"]
    layers = c.get("layers")
    _require(isinstance(layers, list) and layers and all(isinstance(i, int) and 0 <= i < depth for i in layers)
             and layers == sorted(set(layers)), f"capture.layers must be sorted distinct indices < {depth}")
    _require(c.get("payload") in ("probs", "logits", "qk"), f"capture.payload {c.get('payload')!r} unknown")
    shape = c.get("map_shape")
    _require(shape == [len(layers), t["num_heads"], t["num_tokens"], t["num_tokens"]],
             "capture.map_shape must be [len(layers), num_heads, num_tokens, num_tokens]")
    codec = m["codec"]
    _require(isinstance(codec.get("name"), str) and isinstance(codec.get("fields"), dict) and codec["fields"],
             "codec.name and codec.fields are required")
    for name, spec in codec["fields"].items():
        _require(re.fullmatch(r"[a-z][a-z0-9_]*", name) is not None, f"codec field name {name!r} invalid")
        fshape, dtype = spec.get("shape"), spec.get("dtype")
        _require(dtype in ("float16", "float32", "bfloat16", "int8", "uint8", "int16", "uint16"),
                 f"codec.fields.{name}.dtype {dtype!r} not allowed")
        _require(isinstance(fshape, list) and all(isinstance(s, int) and s > 0 for s in fshape),
                 f"codec.fields.{name}.shape invalid")
        _require(math.prod(fshape) * 4 <= MAX_RECORD_BYTES, f"codec.fields.{name} too large")
    comp = codec.get("compressor")
    _require(isinstance(comp, dict) and comp.get("id") in ("blosc", "zstd", None) or comp is None,
             f"codec.compressor {comp!r}: only blosc or zstd are accepted")
    d = m["dataset"]
    n = _int_in(d, "num_samples", 1, 2**40, "dataset")
    v = m["views"]
    k = _int_in(v, "views_per_image", 1, 1 << 16, "views")
    s = m["store"]
    _require(s.get("format") in STORE_FORMATS, f"store.format {s.get('format')!r} unknown")
    records = _int_in(s, "records", 1, 2**48, "store")
    _require(records == n * k, f"store.records {records} != num_samples {n} x views_per_image {k}")
    per_shard = _int_in(s, "records_per_shard", 1, 2**32, "store")
    shards = s.get("shards")
    _require(isinstance(shards, list) and len(shards) == math.ceil(records / per_shard),
             "store.shards must list every shard")
    for i, shard in enumerate(shards):
        _require(shard.get("index") == i and shard.get("first_record") == i * per_shard
                 and shard.get("records") == min(per_shard, records - i * per_shard),
                 f"store.shards[{i}] index/first_record/records inconsistent")
        _check_files(shard.get("files"), f"store.shards[{i}].files")
    for name in (SAMPLES, VIEWS):
        _check_files([m["files"].get(name)], f"files.{name}")
        _require(m["files"][name]["path"] == name, f"files.{name}.path must be {name!r}")
    return m


def _check_files(files, where: str) -> None:
    _require(isinstance(files, list) and files, f"{where} must be a non-empty list")
    for f in files:
        _require(isinstance(f, dict), f"{where}: entries must be objects")
        safe_relpath(f.get("path"), where)
        _require(isinstance(f.get("bytes"), int) and f["bytes"] >= 0, f"{where}: bytes invalid")
        _require(isinstance(f.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", f["sha256"]) is not None,
                 f"{where}: sha256 invalid")

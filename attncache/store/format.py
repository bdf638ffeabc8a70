"""The cache format, defined once: file layout, row arithmetic, the manifest's schema and every rule it must obey.

docs/format.md is the human-readable spec of what this module writes and accepts; `manifest.schema.json` beside it
is the machine-readable part (types and ranges of every field). A cache from another lab is untrusted input: its
manifest is parsed strictly (no duplicate keys, no NaN), checked against the schema, then against the cross-field
rules below, before any shard is read. Every violation is a CacheFormatError naming the field.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import re
from importlib import resources

from ..codecs import CaptureShape, Codec, get_codec
from ..errors import AttncacheError, CacheFormatError
from ..files import StrictJSONError, dumps_canonical, loads_strict
from .records import KEYS_TABLE as KEYS
from .records import (  # noqa: F401 - what a valid sample and view are: defined with the tables, used here too
    MAX_IMAGE_SIDE,
    MAX_KEY_BYTES,
    MAX_KEY_CHARS,
    TABLES,
    check_view,
    sample_problem,
    table_dtypes,
    table_entry_rows,
)
from .tables import table_bytes

FORMAT_NAME = "attncache"
# 2 adds the optional view field `resize` (timm's eval transform); 3 adds `augment`, `erase` and `mix` (and the
# policy's `augment`); 4 adds a crc32c after every stored chunk and the manifest's `content_sha256` (a digest of the
# manifest's own content, so an edited codec parameter or label count is caught, not decoded). Every cache is now
# written as version 4; all four are read (1-3 without the per-chunk checks: `attncache verify` hashes them whole).
# 5 replaces samples.jsonl and views.jsonl by fixed-width tables read by row (records.py): a reader parses nothing
# per record it does not read, and mixing partners are sample indices.
FORMAT_VERSION = 5
READABLE_VERSIONS = (1, 2, 3, 4, 5)
TABLES_VERSION = 5
DIGEST_FIELD = "content_sha256"

MANIFEST = "manifest.json"
SAMPLES = "samples.jsonl"  # versions 1-4: one JSON object per image, in sample-index order
VIEWS = "views.jsonl"  # versions 1-4: one JSON object per record, in row order
# A codec's side files (teacher_qk.safetensors, inputs_basis.safetensors) are named by the codec that carries them
# (`Codec.side_files`, codecs/base.py) and listed in the manifest's `files` like the record files.
PROGRESS_DIR = ".progress"  # resume state of an unfinished extraction; never part of a finished cache
PLAN = f"{PROGRESS_DIR}/plan.json"

STORE_FORMATS = ("zarr", "wds")
WDS_SHARD_DIR = "shards"

MAX_MANIFEST_BYTES = 64 << 20
MAX_TABLE_BLOCK_BYTES = 16 << 20  # a reader holds a few blocks of each table
# One record's decoded float32 maps (ViT-L/16, 24 layers at 224 px: 0.2 GB; DINOv2-g/14 at 518 px: 7.2 GB). A reader
# allocates batch x this: a manifest may not declare more, whatever its other fields say.
MAX_RECORD_MAP_BYTES = 8 << 30


def row_of(sample_index: int, view: int, num_samples: int) -> int:
    """Records are view-major: all images' view 0, then view 1, ... so one epoch can stream one view's shards."""
    return view * num_samples + sample_index


def sample_and_view(row: int, num_samples: int) -> tuple[int, int]:
    view, sample_index = divmod(row, num_samples)
    return sample_index, view


def wds_shard_name(index: int) -> str:
    return f"{WDS_SHARD_DIR}/shard-{index:06d}.tar"


def zarr_shard_name(field: str, index: int, ndim: int) -> str:
    """Zarr v3 default chunk key of shard `index` along the record axis of a field with `ndim` record dims."""
    return f"{field}/c/{index}" + "/0" * ndim


def shard_paths(manifest_store: str, fields: dict, index: int) -> list[str]:
    """The files that make up shard `index` (what the manifest must list, and nothing else)."""
    if manifest_store == "wds":
        return [wds_shard_name(index)]
    return [zarr_shard_name(name, index, len(spec["shape"])) for name, spec in fields.items()]


def metadata_paths(manifest_store: str, fields: dict) -> list[str]:
    return ["zarr.json"] + [f"{name}/zarr.json" for name in fields] if manifest_store == "zarr" else []


def has_chunk_checksums(manifest: dict) -> bool:
    return manifest["version"] >= 4


def content_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own `content_sha256` (what that field holds)."""
    return hashlib.sha256(dumps_canonical({k: v for k, v in manifest.items() if k != DIGEST_FIELD})).hexdigest()


def seal(manifest: dict) -> dict:
    """The manifest with its `content_sha256` set (version 4 on), as writers store it."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_FIELD}
    version = body.get("version")
    if isinstance(version, int) and version < 4:
        return body
    try:
        return {**body, DIGEST_FIELD: content_digest(body)}
    except (TypeError, ValueError):  # not JSON (NaN, ...): validation names the field
        return body


def dataset_fingerprint(samples: list[dict]) -> str:
    """sha256 over `key \\t sha256 \\n` of every image, in sample order."""
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s['key']}\t{s['sha256']}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Manifest validation


@functools.cache
def manifest_schema() -> dict:
    return json.loads(resources.files(__package__).joinpath("manifest.schema.json").read_text())


@functools.cache
def _validator():
    import jsonschema

    base = jsonschema.Draft202012Validator
    # JSON Schema's "integer" admits 1.0; a field we index or allocate with must be a real integer.
    checker = base.TYPE_CHECKER.redefine(
        "integer", lambda _, v: isinstance(v, int) and not isinstance(v, bool))
    # The shard list (20,000 entries for ImageNet x 4 views) is checked by `_check_shard_entries` to the same
    # rules: jsonschema takes ~0.4 ms per entry, 8 s for that list, and every reader process opens the manifest.
    schema = copy.deepcopy(manifest_schema())
    schema["properties"]["store"]["properties"]["shards"]["items"] = True
    return jsonschema.validators.extend(base, type_checker=checker)(schema)


SHARD_KEYS = frozenset(("index", "first_record", "records", "files"))
FILE_PATH = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")  # the schema's pattern of a file's path
FILE_KEYS = frozenset(("path", "bytes", "sha256"))
MAX_FILE_BYTES = 1 << 50


def _check_shard_entries(shards: list) -> None:
    """What the schema says of `store.shards[i]` (see `_validator`), in a plain loop."""
    def is_int(v, low, high) -> bool:
        return type(v) is int and low <= v <= high

    for i, shard in enumerate(shards):
        ok = (type(shard) is dict and shard.keys() == SHARD_KEYS and is_int(shard["index"], 0, 1 << 62)
              and is_int(shard["first_record"], 0, 1 << 62) and is_int(shard["records"], 1, 1 << 62)
              and type(shard["files"]) is list and 1 <= len(shard["files"]) <= 8)
        ok = ok and all(type(f) is dict and f.keys() == FILE_KEYS and type(f["path"]) is str
                        and is_int(f["bytes"], 0, MAX_FILE_BYTES) and type(f["sha256"]) is str
                        and len(f["sha256"]) == 64 and not f["sha256"].strip("0123456789abcdef")
                        for f in shard["files"])
        if not ok:
            raise CacheFormatError(f"manifest: store.shards.{i}: expected {{index, first_record, records, files: "
                                   "[{path, bytes, sha256}]}} with integers in range and sha256 hex digests")
        for j, f in enumerate(shard["files"]):
            if len(f["path"]) > 512 or not FILE_PATH.fullmatch(f["path"]):
                raise CacheFormatError(f"manifest: store.shards.{i}.files.{j}.path: {f['path'][:100]!r} is not a "
                                       "relative path of letters, digits, '.', '_' and '-'")


def parse_manifest(data: bytes, codec: bool = True) -> dict:
    """Strictly parse and validate a manifest's bytes (`codec`: as `validate_manifest`)."""
    try:
        manifest = loads_strict(data)
    except StrictJSONError as exc:
        raise CacheFormatError(f"manifest: {exc}") from exc
    return validate_manifest(manifest, codec)


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise CacheFormatError(f"manifest: {msg}")


def _schema_errors(m) -> None:
    import jsonschema

    error = jsonschema.exceptions.best_match(_validator().iter_errors(m))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        message = " ".join(error.message.split())
        raise CacheFormatError(f"manifest: {where}: {message[:200]}{'...' if len(message) > 200 else ''}")


def validate_manifest(m: dict, codec: bool = True) -> dict:
    """Check a parsed manifest against the schema and the cross-field rules; returns it unchanged.

    `codec=False` leaves out the rules that need the named codec built (its fields, compressor, payload and side
    files): what copies and hashes the files a manifest names needs only the rest, and works for a codec this
    attncache does not know. Reading the records needs them all."""
    _require(isinstance(m, dict), "not a JSON object")
    _require(m.get("format") == FORMAT_NAME, f"format must be {FORMAT_NAME!r}, got {m.get('format')!r}")
    _require(m.get("version") in READABLE_VERSIONS,
             f"version {m.get('version')!r} is not supported (this attncache reads versions "
             f"{', '.join(map(str, READABLE_VERSIONS))})")
    _schema_errors(m)
    _check_teacher(m["teacher"])
    _check_capture(m)
    checked = _check_codec(m) if codec else None
    n, k = m["dataset"]["num_samples"], m["views"]["views_per_image"]
    _require(m["views"]["split"] == "train" or k == 1, "views: a val split has one view per image")
    _require(m["views"]["scale"][0] <= m["views"]["scale"][1] and m["views"]["ratio"][0] <= m["views"]["ratio"][1],
             "views.scale and views.ratio must be [min, max]")
    _require("augment" not in m["views"] or (m["version"] >= 3 and m["views"]["split"] == "train"),
             "views.augment needs format version 3 and the train split")
    _check_shard_entries(m["store"]["shards"])
    _check_store(m["store"], m["codec"]["fields"], n * k)
    for name in m["files"]:
        _require(m["files"][name]["path"] == name, f"files.{name}.path must be {name!r}")
    _check_record_files(m)
    if checked is not None:
        _check_side_files(m, checked)
    # last, so a value out of range is named as such; a valid value changed by hand is caught here
    _require((DIGEST_FIELD in m) == (m["version"] >= 4), f"{DIGEST_FIELD} is required from format version 4 on")
    _require(DIGEST_FIELD not in m or m[DIGEST_FIELD] == content_digest(m),
             f"{DIGEST_FIELD} does not match the manifest's content (edited or damaged)")
    return m


def uses_tables(m: dict) -> bool:
    return m["version"] >= TABLES_VERSION


def record_files(m: dict) -> tuple[str, ...]:
    """The files that hold a cache's per-record metadata."""
    return TABLES if uses_tables(m) else (SAMPLES, VIEWS)


def _check_record_files(m: dict) -> None:
    """Version 5: the four tables, each with the rows, block size and row width the format gives it, and the
    file size that follows; versions 1-4: the two JSONL files, no table."""
    names = set(record_files(m))
    others = {SAMPLES, VIEWS} | set(table_entry_rows(m))
    for name in others:
        _require((name in m["files"]) == (name in names),
                 f"files.{name}: {'required' if name in names else 'not part of'} format version {m['version']}")
    for name, entry in m["files"].items():
        _require(("table" in entry) == (name in names and name.endswith(".bin")),
                 f"files.{name}.table: only the record tables of version {TABLES_VERSION} have one")
    if not uses_tables(m):
        return
    dtypes, rows = table_dtypes(m), table_entry_rows(m)
    heap = m["files"][KEYS]["table"]["rows"]
    _require(m["dataset"]["num_samples"] <= heap <= m["dataset"]["num_samples"] * MAX_KEY_BYTES,
             f"files.{KEYS}.table.rows: a key has 1..{MAX_KEY_BYTES} bytes")
    for name in rows:
        t = m["files"][name]["table"]
        expected = rows[name] if rows[name] is not None else t["rows"]
        _require(t["rows"] == expected, f"files.{name}.table.rows must be {expected}")
        _require(t["row_bytes"] == dtypes[name].itemsize,
                 f"files.{name}.table.row_bytes must be {dtypes[name].itemsize} (the format's row layout)")
        _require(t["rows_per_block"] * t["row_bytes"] <= MAX_TABLE_BLOCK_BYTES,
                 f"files.{name}.table: blocks of more than {MAX_TABLE_BLOCK_BYTES >> 20} MiB")
        _require(m["files"][name]["bytes"] == table_bytes(t["rows"], t["rows_per_block"], t["row_bytes"]),
                 f"files.{name}.bytes must be rows x row_bytes + 4 per block")


def _check_teacher(t: dict) -> None:
    _require(t["image_size"] % t["patch_size"] == 0, "teacher.image_size must be a multiple of teacher.patch_size")
    grid = t["image_size"] // t["patch_size"]
    _require(t["num_tokens"] == t["num_prefix_tokens"] + grid * grid,
             "teacher.num_tokens must be num_prefix_tokens + (image_size / patch_size)^2")
    _require(t["embed_dim"] % t["num_heads"] == 0, "teacher.embed_dim must be a multiple of teacher.num_heads")
    # model_args rebuild the architecture: they must not contradict the recorded geometry
    for arg in ("embed_dim", "depth", "num_heads", "patch_size"):
        if arg in t["model_args"]:
            _require(t["model_args"][arg] == t[arg], f"teacher.model_args.{arg} contradicts teacher.{arg}")
    _require("img_size" not in t["model_args"], "teacher.model_args.img_size: the image size is teacher.image_size")


def _check_capture(m: dict) -> None:
    t, c = m["teacher"], m["capture"]
    layers = c["layers"]
    _require(layers == sorted(set(layers)) and layers[-1] < t["depth"],
             f"capture.layers must be sorted distinct indices < teacher.depth {t['depth']}")
    _require(c["map_shape"] == [len(layers), t["num_heads"], t["num_tokens"], t["num_tokens"]],
             "capture.map_shape must be [len(layers), num_heads, num_tokens, num_tokens]")
    _require(math.prod(c["map_shape"]) * 4 <= MAX_RECORD_MAP_BYTES,
             f"capture.map_shape {c['map_shape']}: one record's maps would decode to more than "
             f"{MAX_RECORD_MAP_BYTES >> 30} GiB")


def _check_codec(m: dict) -> Codec:
    """The fields and compressor must be exactly what the named codec and parameters write for this teacher's
    geometry, and its payload one the codec encodes: a reader never trusts a shape or dtype the codec would not
    have written, nor a parameter the bytes were not made with. Returns the codec (unbound)."""
    c, codec_json = m["capture"], m["codec"]
    try:
        codec = get_codec(codec_json["name"], **codec_json["params"])
        readable = [{k: v.to_json() for k, v in f.items()} for f in codec.readable_fields(capture_shape(m))]
    except AttncacheError as exc:
        raise CacheFormatError(f"manifest: codec: {exc}") from exc
    _require(codec.params == codec_json["params"],
             f"codec.params {codec_json['params']} are not codec {codec.name!r}'s canonical parameters")
    _require(c["payload"] in codec.payloads, f"codec {codec.name!r} cannot hold payload {c['payload']!r}")
    _require(codec_json["fields"] in readable,
             f"codec.fields do not match codec {codec.name!r} with params {codec.params}")
    _require(codec_json["compressor"] == codec.compressor(),
             f"codec.compressor does not match codec {codec.name!r}")
    return codec


def _check_side_files(m: dict, codec: Codec) -> None:
    """Beside the record files, `files` names exactly the side files the codec carries: a reader binds each one, and
    a file no codec reads is no part of the cache."""
    carried = {side.name for side in codec.side_files}
    named = set(m["files"]) - {SAMPLES, VIEWS, *TABLES}
    for name in sorted(carried | named):
        _require((name in named) == (name in carried), f"files.{name} must be there exactly when the codec carries "
                                                       f"it (codec {codec.name!r} carries {sorted(carried)})")


def capture_shape(m: dict) -> CaptureShape:
    """One record's capture geometry, from a manifest's teacher and layers (what the codec's fields follow)."""
    t = m["teacher"]
    return CaptureShape(len(m["capture"]["layers"]), t["num_heads"], t["num_tokens"], t["embed_dim"] // t["num_heads"])


def _check_store(s: dict, fields: dict, records: int) -> None:
    _require(s["records"] == records, f"store.records {s['records']} != num_samples x views_per_image ({records})")
    per_shard = s["records_per_shard"]
    _require(per_shard <= records, "store.records_per_shard exceeds store.records")
    _require(len(s["shards"]) == math.ceil(records / per_shard), "store.shards must list every shard")
    _require(s["format"] == "wds" or not s["embed_images"], "store.embed_images needs store.format wds")
    for i, shard in enumerate(s["shards"]):
        _require(shard["index"] == i and shard["first_record"] == i * per_shard
                 and shard["records"] == min(per_shard, records - i * per_shard),
                 f"store.shards[{i}] index/first_record/records inconsistent")
        _require([f["path"] for f in shard["files"]] == shard_paths(s["format"], fields, i),
                 f"store.shards[{i}].files must be {shard_paths(s['format'], fields, i)}")
    _require(sorted(f["path"] for f in s["metadata_files"]) == sorted(metadata_paths(s["format"], fields)),
             f"store.metadata_files must be {metadata_paths(s['format'], fields)}")


def named_files(m: dict) -> list[dict]:
    """Every file entry ({path, bytes, sha256}) of a validated manifest: shards, metadata, index files."""
    s = m["store"]
    return [f for shard in s["shards"] for f in shard["files"]] + s["metadata_files"] + list(m["files"].values())


# ---------------------------------------------------------------------------------------------------------------
# samples.jsonl and views.jsonl


def parse_jsonl(data: bytes, where: str) -> list:
    out = []
    for i, line in enumerate(data.split(b"\n")):
        if not line and i == data.count(b"\n"):
            continue  # the final newline
        try:
            out.append(loads_strict(line))
        except StrictJSONError as exc:
            raise CacheFormatError(f"{where}: line {i + 1}: {exc}") from exc
    return out


def check_samples(samples: list, manifest: dict, where: str = SAMPLES) -> list[dict]:
    n, classes = manifest["dataset"]["num_samples"], manifest["dataset"]["classes"]
    if len(samples) != n:
        raise CacheFormatError(f"{where}: {len(samples)} lines, manifest says {n}")
    keys = set()
    for i, s in enumerate(samples):
        bad = sample_problem(s, classes)
        if bad:
            raise CacheFormatError(f"{where}: line {i + 1}: {bad}")
        if s["key"] in keys:
            raise CacheFormatError(f"{where}: line {i + 1}: duplicate key {s['key']!r}")
        keys.add(s["key"])
    if dataset_fingerprint(samples) != manifest["dataset"]["fingerprint"]:
        raise CacheFormatError(f"{where}: does not match dataset.fingerprint")
    return samples


def check_views(views: list, samples: list[dict], manifest: dict, where: str = VIEWS) -> list:
    """Versions 1-4: every line parses as a view of its record (see `check_view`). Returns the parsed `View` of
    every row, mixing partners with their sample index."""
    from dataclasses import replace

    from ..views import View

    n, records = manifest["dataset"]["num_samples"], manifest["store"]["records"]
    if len(views) != records:
        raise CacheFormatError(f"{where}: {len(views)} lines, manifest says {records} records")
    by_key, parsed = None, []
    for row, v in enumerate(views):
        sample_index, view_index = sample_and_view(row, n)
        if not isinstance(v, dict) or v.get("sample") != sample_index or v.get("view") != view_index:
            raise CacheFormatError(f"{where}: line {row + 1}: expected sample {sample_index}, view {view_index}")
        try:
            view = View.from_json({k: x for k, x in v.items() if k not in ("sample", "view")})
            partner = None
            if view.mix is not None:
                by_key = by_key or {x["key"]: i for i, x in enumerate(samples)}
                if view.mix.partner not in by_key:
                    raise AttncacheError(f"mix partner {view.mix.partner!r} is not a sample of this cache")
                partner = samples[by_key[view.mix.partner]]
                view = replace(view, mix=replace(view.mix, partner_index=by_key[view.mix.partner]))
            check_view(view, samples[sample_index], partner, manifest)
        except AttncacheError as exc:
            raise CacheFormatError(f"{where}: line {row + 1}: {exc}") from exc
        parsed.append(view)
    return parsed

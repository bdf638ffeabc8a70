"""What an extraction will write (its plan), and the bookkeeping that lets a killed one resume where it stopped.

The plan is the manifest minus what only exists once the shards do (shard list, timestamps). It is written to
`.progress/plan.json` when the cache directory is claimed; each durable shard gets a marker
`.progress/shard-NNNNNN.json` with its files' sizes, sha256 and mtimes. A re-run checks markers by size and mtime
(cheap), so resuming costs what is left. A finished cache (manifest present) is checked by file sizes only; a
full re-hash, and the rewrite of any shard that differs, is `--repair` (or `attncache verify` to only look).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import time
from pathlib import Path

from ..codecs import side_file_names
from ..errors import AttncacheError
from ..files import StrictJSONError, atomic_write_json, dumps_canonical, read_json, remove_partials, write_jsonl
from ..rundir import RunDir
from ..store.format import (
    MANIFEST,
    PLAN,
    PROGRESS_DIR,
    SAMPLES,
    VIEWS,
    WDS_SHARD_DIR,
    metadata_paths,
    named_files,
    parse_jsonl,
    parse_manifest,
    seal,
    shard_paths,
    validate_manifest,
)
from ..store.fs import CacheFS
from ..store.records import TABLES, RecordTables

TARGET_SHARD_BYTES = 256 << 20  # raw bytes per shard before compression; webdataset's usual 100 MB-1 GB range
PLAN_STORE_KEYS = ("format", "records", "records_per_shard", "embed_images")
SCAN = f"{PROGRESS_DIR}/scan.jsonl"
SCAN_LOG_EVERY = 10_000  # images hashed between two appends to the scan log
TABLES_MARKER = f"{PROGRESS_DIR}/tables.json"  # the record tables' entries, once they are durable


def default_records_per_shard(record_bytes: int) -> int:
    return int(max(1, min(4096, TARGET_SHARD_BYTES // max(1, record_bytes))))


def index_file_entry(name: str, data: bytes) -> dict:
    return {"path": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def plan_differences(old: dict, new: dict) -> list[str]:
    """Sections of the plan that differ (a finished manifest adds shard lists and timestamps: not compared)."""
    out = []
    for key in new:
        a, b = old.get(key), new[key]
        if key == "store" and isinstance(a, dict):
            a = {k: a.get(k) for k in PLAN_STORE_KEYS}
        if key == "files" and isinstance(a, dict) and isinstance(b, dict):  # the tables join at finish()
            a = {k: a.get(k) for k in b}
        if dumps_canonical(a) != dumps_canonical(b):
            out.append(key)
    derived = ("files", "version")  # follow from the views and the images: named only when nothing else differs
    return [k for k in out if k not in derived] or out


def _recorded_plan(out: Path) -> dict:
    return read_json(out / PLAN) if (out / PLAN).is_file() else read_json(out / MANIFEST)


def _started(out: Path, old_plan: dict) -> bool:
    """A cache has something of value once a shard is durable (or it is finished)."""
    return (out / MANIFEST).is_file() or any((out / PROGRESS_DIR).glob("shard-*.json"))


def _discard(out: Path, old_plan: dict) -> None:
    """Remove an unstarted extraction's files: exactly the names its plan gives them."""
    fields = old_plan.get("codec", {}).get("fields", {}) if isinstance(old_plan.get("codec"), dict) else {}
    for name in (PROGRESS_DIR, WDS_SHARD_DIR, *[n for n in fields if isinstance(n, str) and n.isidentifier()]):
        if (out / name).is_dir() and not (out / name).is_symlink():
            shutil.rmtree(out / name)
    for name in (SAMPLES, VIEWS, *TABLES, *side_file_names(), "zarr.json"):
        (out / name).unlink(missing_ok=True)


def run_dir(out: str | Path) -> RunDir:
    """The extraction's run state in `out` (rundir.py): its claim, lock, plan and resume (not `--cache-dir`, the
    node-local copy of a remote cache that readers keep)."""
    return RunDir(out, kind="cache", plan_file=PLAN, done_file=MANIFEST, started=_started,
                  recorded_plan=_recorded_plan, differences=plan_differences, discard=_discard, unclaimed=(SCAN,))


def check_out_is_free(out: Path) -> None:
    """The cheap part of the directory check, before the teacher is built."""
    if out.exists() and not out.is_dir():
        raise AttncacheError(f"`out` {out}: exists and is not a directory")
    if out.is_dir() and not run_dir(out).is_free() and not run_dir(out).is_ours():
        raise AttncacheError(f"`out` {out}: not empty and holds no attncache cache; choose an empty or new "
                             "directory")


# ---------------------------------------------------------------------------------------------------------------
# a finished cache


def finished_unchanged(out: Path, head: dict, dataset: dict, keys: list[str]) -> dict | None:
    """The manifest of a finished cache made by this plan, every file of the right size; else None.

    `head` holds the plan's sections that need no image (teacher, capture, codec, views, store) and `dataset` its
    dataset section without the content fingerprint; the images are compared by key only (hashing them is the
    full scan this check exists to avoid; training still checks each image's sha256 when it reads it)."""
    if not (out / MANIFEST).is_file():
        return None
    try:
        manifest = parse_manifest((out / MANIFEST).read_bytes())
        if plan_differences(manifest, head) or {k: manifest["dataset"].get(k) for k in dataset} != dataset:
            return None
        if not all(_size_matches(out, f) for f in named_files(manifest)):
            return None
        return manifest if _recorded_keys_are(out, manifest, keys) else None
    except (OSError, AttncacheError, KeyError, TypeError):
        return None


def _recorded_keys_are(out: Path, manifest: dict, keys: list[str]) -> bool:
    """Does the finished cache hold exactly these keys, in this order (read a chunk at a time)?"""
    if len(keys) != manifest["dataset"]["num_samples"]:
        return False
    if manifest["version"] < 5:
        return [s["key"] for s in parse_jsonl((out / SAMPLES).read_bytes(), SAMPLES)] == keys
    start = 0
    for chunk in RecordTables.open(CacheFS(out), manifest).iter_keys():
        if chunk != keys[start:start + len(chunk)]:
            return False
        start += len(chunk)
    return True


def recorded_index_file(out: Path, head: dict, name: str) -> bytes | None:
    """The bytes of index file `name` as an earlier run of this plan (in progress or finished) recorded it, if the
    file is intact; else None. A fitted basis is reused from here, never fitted again: a refit on another device
    could differ in the last bits, and the shards already written were coded in the recorded one."""
    try:
        recorded = _recorded_plan(out)
        entry = recorded["files"][name]
    except (OSError, AttncacheError, KeyError, TypeError):
        return None
    if plan_differences(recorded, head) or not _size_matches(out, entry):
        return None
    data = (out / name).read_bytes()
    return data if hashlib.sha256(data).hexdigest() == entry["sha256"] else None


def reopen_finished(out: Path) -> None:
    """Turn a finished cache back into a resumable one: its manifest's shard entries become completion markers
    (their files are checked again like any marker's), and the manifest goes until the cache is whole again."""
    manifest = read_json(out / MANIFEST)
    for shard in manifest["store"]["shards"]:
        marker = marker_path(out, shard["index"])
        if not marker.exists():
            atomic_write_json(marker, {"files": shard["files"]})
    tables = {name: manifest["files"][name] for name in TABLES if name in manifest["files"]}
    if tables and not (out / TABLES_MARKER).exists():
        atomic_write_json(out / TABLES_MARKER, tables)
    (out / MANIFEST).unlink()


# ---------------------------------------------------------------------------------------------------------------
# the record tables (written once per plan by the main process, then read by every rank)


def write_tables_marker(out: Path, entries: dict[str, dict]) -> None:
    atomic_write_json(out / TABLES_MARKER, {name: {**entry, "mtime_ns": (out / name).stat().st_mtime_ns}
                                            for name, entry in entries.items()})


def _tables_marker(out: Path) -> dict[str, dict] | None:
    try:
        entries = read_json(out / TABLES_MARKER)
    except (OSError, StrictJSONError):
        return None
    return entries if isinstance(entries, dict) and sorted(entries) == sorted(TABLES) else None


def tables_done(out: Path, full: bool = False) -> bool:
    """Are the tables of this plan durable and intact (size and mtime; with `full`, sha256)?"""
    entries = _tables_marker(out)
    return entries is not None and all(_intact(out, e, full) for e in entries.values())


def table_entries(out: Path) -> dict[str, dict]:
    """The tables' manifest entries (without the resume-only mtime)."""
    entries = _tables_marker(out)
    if entries is None:
        raise AttncacheError(f"{out}: the record tables of this extraction are not written ({TABLES_MARKER})")
    return {name: {k: v for k, v in e.items() if k != "mtime_ns"} for name, e in entries.items()}


def open_tables(out: Path) -> RecordTables:
    """The tables of the extraction in progress in `out`, read like a finished cache's."""
    plan = read_json(out / PLAN)
    return RecordTables.open(CacheFS(out), {**plan, "files": {**plan["files"], **table_entries(out)}})


# ---------------------------------------------------------------------------------------------------------------
# shard markers


def marker_path(out: Path, shard: int) -> Path:
    return out / PROGRESS_DIR / f"shard-{shard:06d}.json"


def file_record(out: Path, rel: str) -> dict:
    """{path, bytes, sha256} of a file just written, plus its mtime (for the cheap resume check)."""
    path = out / rel
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    st = path.stat()
    return {"path": rel, "bytes": st.st_size, "sha256": h.hexdigest(), "mtime_ns": st.st_mtime_ns}


def write_marker(out: Path, shard: int, paths: list[str]) -> None:
    atomic_write_json(marker_path(out, shard), {"files": [file_record(out, p) for p in paths]})


def _size_matches(out: Path, entry: dict) -> bool:
    path = out / entry["path"]
    return path.is_file() and not path.is_symlink() and path.stat().st_size == entry["bytes"]


def _intact(out: Path, entry: dict, full: bool) -> bool:
    """Does the file still have the recorded size (and mtime, or with `full` its sha256)?"""
    if not _size_matches(out, entry):
        return False
    if full or "mtime_ns" not in entry:
        return file_record(out, entry["path"])["sha256"] == entry["sha256"]
    return (out / entry["path"]).stat().st_mtime_ns == entry["mtime_ns"]


def shard_done(out: Path, shard: int, paths: list[str], full: bool = False) -> bool:
    """A shard is complete when its marker exists and every file it names is intact."""
    try:
        files = read_json(marker_path(out, shard))["files"]
    except (OSError, StrictJSONError, KeyError, TypeError):
        return False
    if sorted(f["path"] for f in files) != sorted(paths):
        return False
    return all(_intact(out, f, full) for f in files)


def shard_entry(out: Path, shard: int, per_shard: int, records: int) -> dict:
    files = [{k: f[k] for k in ("path", "bytes", "sha256")} for f in read_json(marker_path(out, shard))["files"]]
    first = shard * per_shard
    return {"index": shard, "first_record": first, "records": min(per_shard, records - first), "files": files}


def num_shards(records: int, per_shard: int) -> int:
    return math.ceil(records / per_shard)


def shards_of(shards: int, slots: int, slot: int) -> list[int]:
    """The whole shards one process writes: shard s belongs to slot s mod slots (slot = job x ranks + rank), so
    processes never share a shard (zarr rewrites a shard whole; two writers would lose records)."""
    return list(range(slot, shards, slots))


def finish(out: Path, required: bool = True) -> dict | None:
    """Write the manifest (last) once every shard of the plan is durable; remove the resume state and any
    temporary file. With `required=False`, None when shards are still missing (another part is writing them)."""
    from .. import __version__

    plan = read_json(out / PLAN)
    store, fields = plan["store"], plan["codec"]["fields"]
    records, per_shard = store["records"], store["records_per_shard"]
    shards = num_shards(records, per_shard)
    missing = [i for i in range(shards) if not shard_done(out, i, shard_paths(store["format"], fields, i))]
    if missing:
        if not required:
            return None
        raise AttncacheError(f"{out}: {len(missing)} of {shards} shards are not finished (e.g. shard {missing[0]}); "
                             "re-run the extraction job(s) that own them (they resume), then merge")
    manifest = {
        **plan,
        "files": {**plan["files"], **(table_entries(out) if plan["version"] >= 5 else {})},
        "created_by": f"attncache {__version__}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "store": {**store, "shards": [shard_entry(out, i, per_shard, records) for i in range(shards)],
                  "metadata_files": [{k: file_record(out, rel)[k] for k in ("path", "bytes", "sha256")}
                                     for rel in metadata_paths(store["format"], fields)]},
    }
    manifest = validate_manifest(seal(manifest))
    remove_partials(out)  # a finished cache holds only the files its format names
    atomic_write_json(out / MANIFEST, manifest)
    remove_progress(out)
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# the scan cache: an interrupted extraction's re-run re-reads only the images that changed


def load_scan(out: Path) -> dict[str, dict]:
    """An earlier scan's records by key (a killed scan's log: its lines up to the last whole one)."""
    try:
        data = (out / SCAN).read_bytes()
        return {r["key"]: r for r in parse_jsonl(data[:data.rfind(b"\n") + 1], SCAN)}
    except (OSError, AttncacheError, KeyError, TypeError):
        return {}


def scan_logger(out: Path):
    """Where a scan in progress records what it has hashed, so a killed scan resumes (None: `out` is not ours to
    write: it holds something else or a finished cache; a refusal comes at the claim). Appends, never rewrites:
    a kill leaves whole lines and at most one torn last line, which `load_scan` drops."""
    unfinished = (out / PLAN).is_file() and not (out / MANIFEST).exists()
    if not (run_dir(out).is_free() or unfinished):  # a finished cache or another's folder: never written to
        return None

    def log(samples, stamps) -> None:
        (out / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
        lines = b"".join(dumps_canonical({**s.to_json(), "stamp": st}) + b"\n" for s, st in zip(samples, stamps,
                                                                                                  strict=True))
        with open(out / SCAN, "ab") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())

    return log


def save_scan(out: Path, samples, entries) -> None:
    """The whole scan (samples, a sequence of dicts, and the listing's entries for their stamps), written by
    streaming: no list of every line is built."""
    write_jsonl(out / SCAN, ({**samples[i], "stamp": entries[i].stamp} for i in range(len(samples))))


def remove_progress(out: Path) -> None:
    """A finished cache carries no resume state."""
    if (out / PROGRESS_DIR).is_dir():
        shutil.rmtree(out / PROGRESS_DIR)

"""Untrusted caches: manifest validation, integrity checks and bounded decoding refuse tampered input."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import google_crc32c
import pytest
import torch
from conftest import as_version_4

from attncache import AttncacheError, CacheFormatError, open_cache
from attncache.store.format import seal, validate_manifest
from attncache.tools.verify import verify_cache


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _tamper(m: dict, what: str) -> dict:
    m = copy.deepcopy(m)
    shard0 = m["store"]["shards"][0]["files"][0]
    if what == "dotdot":
        shard0["path"] = "../x"
    elif what == "dotdot_inside":
        shard0["path"] = "shards/../../etc/passwd"
    elif what == "absolute":
        shard0["path"] = "/etc/passwd"
    elif what == "backslash":
        shard0["path"] = "shards\\..\\x"
    elif what == "version":
        m["version"] = 99
    elif what == "format":
        m["format"] = "npz"
    elif what == "records":
        m["store"]["records"] += 1
    elif what == "views_per_image":
        m["views"]["views_per_image"] = 3
    elif what == "missing_shard":
        m["store"]["shards"].pop()
    elif what == "shard_offsets":
        m["store"]["shards"][1]["first_record"] += 1
    elif what == "tokens":
        m["teacher"]["num_tokens"] = 100_000
    elif what == "map_shape":
        m["capture"]["map_shape"][2] += 1
    elif what == "layers":
        m["capture"]["layers"] = [1, 0]
    elif what == "dtype":
        m["codec"]["fields"]["maps"]["dtype"] = "object"
    elif what == "compressor":
        m["codec"]["compressor"] = {"id": "pickle"}
    elif what == "sha":
        shard0["sha256"] = "not-a-hash"
    elif what == "samples_path":
        m["files"]["samples.bin"]["path"] = "views.bin"
    elif what == "bool_as_int":
        m["dataset"]["num_samples"] = True
    return m


TAMPERING = ["dotdot", "dotdot_inside", "absolute", "backslash", "version", "format", "records", "views_per_image",
             "missing_shard", "shard_offsets", "tokens", "map_shape", "layers", "dtype", "compressor", "sha",
             "samples_path", "bool_as_int"]


@pytest.mark.parametrize("what", TAMPERING)
def test_validate_manifest_rejects_tampering(folder_fp16_wds, what):
    good = _manifest(folder_fp16_wds)
    assert validate_manifest(copy.deepcopy(good)) == good
    paths = what in ("dotdot", "dotdot_inside", "absolute", "backslash")
    # a path other than the exact name the format gives the file is refused, before anything is opened
    with pytest.raises(CacheFormatError, match="^manifest: store.shards" if paths else "^manifest: "):
        validate_manifest(_tamper(good, what))


@pytest.mark.parametrize("what", ["dotdot", "absolute", "version", "records"])
def test_open_cache_refuses_a_tampered_manifest(wds_copy, what):
    (wds_copy / "manifest.json").write_text(json.dumps(_tamper(_manifest(wds_copy), what)))
    with pytest.raises(CacheFormatError):
        open_cache(str(wds_copy))


def test_manifest_paths_are_named_in_the_error(wds_copy):
    (wds_copy / "manifest.json").write_text(json.dumps(_tamper(_manifest(wds_copy), "absolute")))
    with pytest.raises(CacheFormatError, match=re.escape("store.shards.0.files.0.path: '/etc/passwd'")):
        verify_cache(str(wds_copy))


def test_not_a_cache(tmp_path):
    with pytest.raises(AttncacheError, match="not an attncache cache"):
        open_cache(str(tmp_path))


@pytest.mark.parametrize("fmt", ["wds", "zarr"])
def test_verify_detects_a_flipped_byte_and_names_the_file(request, fmt):
    root = request.getfixturevalue(f"{fmt}_copy")
    assert verify_cache(str(root))["records"] == 12
    m = _manifest(root)
    rel = m["store"]["shards"][1]["files"][0]["path"]
    data = bytearray((root / rel).read_bytes())
    data[len(data) // 3] ^= 0x10
    (root / rel).write_bytes(bytes(data))
    with pytest.raises(CacheFormatError, match=re.escape(f"{root}/{rel}: size/sha256 mismatch")):
        verify_cache(str(root))


def test_verify_detects_edited_index_files(wds_copy, tmp_path):
    legacy = tmp_path / "v4"
    shutil.copytree(wds_copy, legacy)
    as_version_4(legacy)
    views = legacy / "views.jsonl"
    views.write_text(views.read_text().replace('"flip":false', '"flip":true', 1))
    with pytest.raises(CacheFormatError, match="views.jsonl"):
        verify_cache(str(legacy))
    table = bytearray((wds_copy / "views.bin").read_bytes())
    table[3] ^= 1
    (wds_copy / "views.bin").write_bytes(bytes(table))
    for quick in (True, False):
        with pytest.raises(CacheFormatError, match="views.bin"):
            verify_cache(str(wds_copy), quick=quick)


def _rewrite_member(tar_path: Path, name: str, edit) -> None:
    """Rewrite one member of a tar shard in place (other members unchanged)."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as out:
        for m, data in members:
            if m.name == name:
                data = edit(data[:-4])  # the payload; its crc32c is recomputed: a forgery, not damage
                data += google_crc32c.value(data).to_bytes(4, "little")
                m.size = len(data)
            out.addfile(m, io.BytesIO(data))
    tar_path.write_bytes(buf.getvalue())


def _set_u32(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + value.to_bytes(4, "little") + data[offset + 4:]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        # the blosc header claims a far larger decompressed size than the manifest's field
        (lambda d: _set_u32(d, 4, int.from_bytes(d[4:8], "little") * 1000), "blosc header declares"),
        (lambda d: _set_u32(d, 4, 1 << 31), "blosc header declares"),
        # header and buffer length disagree
        (lambda d: _set_u32(d, 12, int.from_bytes(d[12:16], "little") + 64), "blosc header declares"),
        # a member far larger than any valid encoding of the field
        (lambda d: d + bytes(1 << 20), "limit"),
        (lambda d: d[:8], "not a blosc buffer"),
    ],
)
def test_wds_reader_bounds_decompression(wds_copy, edit, match):
    cache = open_cache(str(wds_copy))
    before = cache.read_rows([0, 1])
    _rewrite_member(wds_copy / "shards/shard-000000.tar", "0000000001.maps", edit)
    cache = open_cache(str(wds_copy))
    assert cache.read_rows([0]).equal(before[:1])  # the untouched record still reads
    with pytest.raises(CacheFormatError, match=match):
        cache.read_rows([1])


def test_wds_missing_member_and_broken_tar(wds_copy):
    with tarfile.open(wds_copy / "shards/shard-000001.tar") as tar:
        kept = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.name != "0000000006.maps"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as out:
        for m, data in kept:
            out.addfile(m, io.BytesIO(data))
    (wds_copy / "shards/shard-000001.tar").write_bytes(buf.getvalue())
    (wds_copy / "shards/shard-000002.tar").write_bytes(b"\x00garbage" * 100)
    cache = open_cache(str(wds_copy))
    with pytest.raises(CacheFormatError, match="0000000006.maps missing"):
        cache.read_rows([6])
    with pytest.raises(CacheFormatError, match="shard-000002.tar"):
        cache.read_rows([10])


def _agree(root: Path, rel: str) -> None:
    """Make the manifest's size and sha256 of `rel` agree with its edited content: the consistent forgery a
    hostile lab would ship (a checksum in the manifest protects against damage, not against its author)."""
    m = _manifest(root)
    data = (root / rel).read_bytes()
    for f in [f for s in m["store"]["shards"] for f in s["files"]] + m["store"]["metadata_files"]:
        if f["path"] == rel:
            f["bytes"], f["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (root / "manifest.json").write_text(json.dumps(seal(m)))  # a forger re-seals the manifest too


def _edit_zarr_json(meta: dict, edit: str) -> dict:
    inner = meta["codecs"][0]["configuration"] if meta.get("node_type") == "array" else None
    if edit == "shape":
        meta["shape"][0] = 10_000  # the array claims more records than the manifest
    elif edit == "transpose":  # queries and keys swapped on read, by any zarr reader that follows this file
        inner["codecs"].insert(0, {"name": "transpose", "configuration": {"order": [0, 1, 2, 4, 3]}})
    elif edit == "fill_value":
        meta["fill_value"] = 0.25
    elif edit == "chunk_keys":
        meta["chunk_key_encoding"] = {"name": "v2", "configuration": {"separator": "."}}
    elif edit == "blosc":
        inner["codecs"][1]["configuration"]["clevel"] = 9
    elif edit == "index_location":
        inner["index_location"] = "start"
    elif edit == "consolidated":  # the group's zarr.json overriding its arrays' metadata
        meta["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": {}}
    return meta


ZARR_EDITS = ["shape", "transpose", "fill_value", "chunk_keys", "blosc", "index_location", "consolidated"]


@pytest.mark.parametrize("edit", ZARR_EDITS)
def test_zarr_metadata_must_be_exactly_what_the_manifest_implies(zarr_copy, edit):
    """Regression: only shape/dtype/chunks/shards were compared, so a `transpose` codec inserted into
    maps/zarr.json made reads return maps with queries and keys swapped, silently."""
    rel = "zarr.json" if edit == "consolidated" else "maps/zarr.json"
    good = open_cache(str(zarr_copy)).read_rows([0, 7])
    (zarr_copy / rel).write_text(json.dumps(_edit_zarr_json(json.loads((zarr_copy / rel).read_text()), edit)))
    with pytest.raises(CacheFormatError, match=re.escape(f"{rel}: does not match the sha256 in the manifest")):
        open_cache(str(zarr_copy))
    _agree(zarr_copy, rel)
    if edit == "transpose":  # the attack is real: plain zarr now reads transposed maps
        import zarr

        plain = zarr.open_group(str(zarr_copy), mode="r")["maps"][0]
        assert torch.equal(torch.from_numpy(plain).float(), good[0].transpose(-1, -2))
    with pytest.raises(CacheFormatError, match=re.escape(f"{rel}: zarr metadata differs from what the manifest "
                                                         "implies")):
        open_cache(str(zarr_copy))


class _Canary:
    """Unpickling this creates the file `path`: any read path that unpickles cache bytes leaves evidence."""

    path = ""

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def canary(tmp_path):
    _Canary.path = str(tmp_path / "canary")
    yield tmp_path / "canary"
    _Canary.path = ""


def _read_everything(root: Path, image_folder: Path, tmp_path: Path) -> list[str]:
    """Open, read every record, verify and train one step from `root`; the one-line errors met on the way."""
    from attncache.train import TrainConfig, train

    errors = []
    for action in (lambda: open_cache(str(root)).read_rows(list(range(12))), lambda: verify_cache(str(root)),
                   lambda: train(TrainConfig(mode="distill", out=str(tmp_path / "run"), cache=str(root),
                                             data=str(image_folder), epochs=1, batch_size=2, workers=0,
                                             max_steps=1, progress=False))):
        try:
            action()
        except AttncacheError as exc:
            assert "\n" not in str(exc)
            errors.append(str(exc))
    return errors


def test_pickled_payloads_are_never_unpickled(zarr_copy, wds_copy, canary, tmp_path, image_folder):
    """Regression (the old test grepped the source): attack the readers with pickles in every place a cache can
    carry bytes, with manifests forged to agree, and check that nothing runs and each read fails in one line."""
    import pickle

    import numcodecs
    import numpy as np

    evil = pickle.dumps(_Canary(), protocol=2)
    obj = np.empty(1, dtype=object)
    obj[0] = _Canary()
    # zarr: an object-dtype array with numcodecs' pickle codec declared in zarr.json (what plain zarr would run)
    meta = json.loads((zarr_copy / "maps/zarr.json").read_text())
    meta["data_type"] = "object"
    meta["codecs"][0]["configuration"]["codecs"] = [{"name": "numcodecs.pickle", "configuration": {}}]
    (zarr_copy / "maps/zarr.json").write_text(json.dumps(meta))
    _agree(zarr_copy, "maps/zarr.json")
    shard = zarr_copy / _manifest(zarr_copy)["store"]["shards"][0]["files"][0]["path"]
    shard.write_bytes(bytes(numcodecs.Pickle().encode(obj)) + shard.read_bytes()[-(5 * 16 + 4):])
    _agree(zarr_copy, shard.relative_to(zarr_copy).as_posix())
    # webdataset: a record's field is a pickle, another's an .npy of objects; its index files carry a pickle
    _rewrite_member(wds_copy / "shards/shard-000000.tar", "0000000001.maps", lambda d: evil)
    npy = io.BytesIO()
    np.save(npy, obj, allow_pickle=True)
    _rewrite_member(wds_copy / "shards/shard-000001.tar", "0000000005.maps", lambda d: npy.getvalue())
    for rel in ("shards/shard-000000.tar", "shards/shard-000001.tar"):
        _agree(wds_copy, rel)
    (wds_copy / "samples.bin").write_bytes(evil)
    for root in (zarr_copy, wds_copy):
        errors = _read_everything(root, image_folder, tmp_path / root.name)
        assert len(errors) == 3, errors
        assert not canary.exists()
    # the manifest itself cannot name a pickling compressor or an object dtype
    for section, value in (("compressor", {"id": "pickle"}), ("fields", {"maps": {"shape": [1], "dtype": "|O"}})):
        m = _manifest(zarr_copy)
        m["codec"][section] = value
        with pytest.raises(CacheFormatError, match="^manifest: codec"):
            validate_manifest(m)


@pytest.mark.parametrize("declared", [1 << 31, 4 << 20])
def test_zarr_reader_refuses_a_corrupt_blosc_frame(zarr_copy, declared):
    """A zarr shard whose first chunk's blosc header lies about its size: a CacheFormatError, not a crash."""
    cache = open_cache(str(zarr_copy))
    good = cache.read_rows([5, 6])
    shard0 = zarr_copy / "maps/c/0/0/0/0/0"  # chunk 0 is the first frame of the shard (index at the end)
    data = bytearray(shard0.read_bytes())
    assert data[:2] == b"\x02\x01"  # blosc1 frame: version 2, versionlz 1
    data[4:8] = declared.to_bytes(4, "little")
    shard0.write_bytes(bytes(data))
    cache = open_cache(str(zarr_copy))
    assert cache.read_rows([5, 6]).equal(good)  # other shards unaffected
    with pytest.raises(CacheFormatError, match="maps"):
        cache.read_rows([0])


@pytest.mark.parametrize("fmt", ["wds", "zarr"])
def test_verify_reports_a_missing_shard_file(request, fmt):
    root = request.getfixturevalue(f"{fmt}_copy")
    rel = _manifest(root)["store"]["shards"][2]["files"][0]["path"]
    (root / rel).unlink()
    with pytest.raises(CacheFormatError, match=re.escape(f"{root}/{rel}: missing")):
        verify_cache(str(root))


def test_zarr_missing_shard_is_an_error_not_zeros(zarr_copy):
    """zarr would read a missing shard as fill values: the reader must refuse rather than hand out zero maps."""
    cache = open_cache(str(zarr_copy))
    assert cache.read_rows([0]).abs().sum() > 0
    rel = _manifest(zarr_copy)["store"]["shards"][1]["files"][0]["path"]
    (zarr_copy / rel).unlink()
    cache = open_cache(str(zarr_copy))
    assert cache.read_rows([0, 11]).shape[0] == 2  # shards 0 and 2 still read
    with pytest.raises(CacheFormatError, match=re.escape(f"{rel}: missing")):
        cache.read_rows([7])
    with pytest.raises(CacheFormatError, match=": missing"):
        cache["bee/b1.png", 1]  # row 9, shard 1


def _paths(node, prefix=()):
    """Every (path, value) in a JSON tree, parents before children."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:3]):  # the first few items of a list stand for the rest
            yield from _paths(v, (*prefix, i))


MUTATIONS = [("delete", None), ("unknown key", None), ("null", None), ("string", "x"), ("negative", -1),
             ("huge", 2**70), ("float", 1e308), ("bool", True), ("list", []), ("object", {})]


def _mutated(m: dict, path: tuple, how: str, value):
    m = copy.deepcopy(m)
    if not path:
        return None
    parent = m
    for p in path[:-1]:
        parent = parent[p]
    key = path[-1]
    if how == "delete":
        if isinstance(parent, list):
            parent.pop(key)
        else:
            del parent[key]
    elif how == "unknown key":
        if not isinstance(parent[key], dict):
            return None
        parent[key]["surprise"] = 1
    else:
        parent[key] = copy.deepcopy(value)
    return m


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_every_malformed_manifest_field_gets_the_one_line_error(request, fmt):
    """Regression: a manifest with a missing or extra `teacher` key raised TypeError out of TeacherSpec.from_json
    and `inspect` printed a traceback. Every field of the manifest is deleted, given an unknown key, or replaced by
    a value of another type or range; opening, summarising, and reading the cache then either works or raises the
    one-line CacheFormatError: no other exception escapes."""
    root = request.getfixturevalue(f"{fmt}_copy")
    good = _manifest(root)
    tried = refused = 0
    for path, _ in list(_paths(good)):
        for how, value in MUTATIONS:
            m = _mutated(good, path, how, value)
            if m is None:
                continue
            (root / "manifest.json").write_text(json.dumps(seal(m)))  # re-sealed: each rule must hold by itself
            tried += 1
            try:
                cache = open_cache(str(root))
                cache.summary()
                cache.read_rows([0, len(cache) - 1])
                cache.check_records()
            except CacheFormatError as exc:
                assert "\n" not in str(exc) and len(str(exc)) < 600, str(exc)
                refused += 1
    assert tried > 500 and refused > 0.9 * tried, (tried, refused)


def test_inspect_of_a_manifest_without_a_teacher_field_is_one_line(wds_copy):
    from attncache_cli.main import app
    from typer.testing import CliRunner

    m = _manifest(wds_copy)
    del m["teacher"]["crop_pct"]
    m["teacher"]["extra_field"] = 1
    (wds_copy / "manifest.json").write_text(json.dumps(seal(m)))
    result = CliRunner().invoke(app, ["inspect", str(wds_copy)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert result.stderr.startswith(f"error: {wds_copy}/manifest.json: teacher: ")

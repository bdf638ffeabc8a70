"""Untrusted caches: manifest validation, integrity checks and bounded decoding refuse tampered input."""

from __future__ import annotations

import copy
import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest

from attncache import AttncacheError, CacheFormatError, open_cache
from attncache.store.format import validate_manifest
from attncache.verify import verify_cache


@pytest.fixture
def wds_copy(tmp_path, folder_fp16_wds) -> Path:
    return Path(shutil.copytree(folder_fp16_wds, tmp_path / "wds"))


@pytest.fixture
def zarr_copy(tmp_path, folder_fp16_zarr) -> Path:
    return Path(shutil.copytree(folder_fp16_zarr, tmp_path / "zarr"))


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
        m["version"] = 2
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
        m["files"]["samples.jsonl"]["path"] = "views.jsonl"
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
    with pytest.raises(CacheFormatError, match="unsafe file path" if paths else "^manifest: "):
        validate_manifest(_tamper(good, what))


@pytest.mark.parametrize("what", ["dotdot", "absolute", "version", "records"])
def test_open_cache_refuses_a_tampered_manifest(wds_copy, what):
    (wds_copy / "manifest.json").write_text(json.dumps(_tamper(_manifest(wds_copy), what)))
    with pytest.raises(CacheFormatError):
        open_cache(str(wds_copy))


def test_manifest_paths_are_named_in_the_error(wds_copy):
    (wds_copy / "manifest.json").write_text(json.dumps(_tamper(_manifest(wds_copy), "dotdot")))
    with pytest.raises(CacheFormatError, match=re.escape("unsafe file path '../x'")):
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


def test_verify_detects_edited_index_files(wds_copy):
    views = wds_copy / "views.jsonl"
    views.write_text(views.read_text().replace('"flip":false', '"flip":true', 1))
    with pytest.raises(CacheFormatError, match="views.jsonl"):
        verify_cache(str(wds_copy))


def _rewrite_member(tar_path: Path, name: str, edit) -> None:
    """Rewrite one member of a tar shard in place (other members unchanged)."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as out:
        for m, data in members:
            if m.name == name:
                data = edit(data)
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


def test_zarr_metadata_must_agree_with_the_manifest(zarr_copy):
    meta_path = zarr_copy / "maps" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["shape"][0] = 10_000  # the array claims more records than the manifest
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CacheFormatError, match="disagrees with the manifest"):
        open_cache(str(zarr_copy))


def test_readers_never_unpickle():
    """Nothing on the read path can execute code from a cache: no pickle, no torch.load, no allow_pickle."""
    import attncache

    pkg = Path(attncache.__file__).parent
    readers = [pkg / "cache.py", pkg / "verify.py", *sorted((pkg / "store").glob("*.py")),
               *sorted((pkg / "codecs").glob("*.py"))]
    assert len(readers) >= 8
    forbidden = [r"\btorch\.load\(", r"\bimport pickle\b", r"\bpickle\.loads?\(", r"allow_pickle\s*=\s*True",
                 r"\bnp\.load\(", r"\beval\(", r"\bexec\("]
    for path in readers:
        text = path.read_text()
        for pattern in forbidden:
            assert re.search(pattern, text) is None, f"{path.name} matches {pattern}"


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
    with pytest.raises(CacheFormatError, match=re.escape(f"{rel}: shard file missing")):
        cache.read_rows([7])
    with pytest.raises(CacheFormatError, match="shard file missing"):
        cache["bee/b1.png", 1]  # row 9, shard 1

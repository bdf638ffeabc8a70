"""A cache from another lab is untrusted input. Each attack here ends in a one-line CacheFormatError (or the reads
are exactly the original's, where the bytes touched are never read), runs nothing, writes nothing outside the
directories chosen, and stays within a stated memory bound.

Memory bound (docs/sharing.md): reading a record allocates at most the manifest's field sizes (checked before
decompressing) plus the shard index; a manifest may not declare records whose maps decode to more than 8 GiB, nor a
student larger than the machine can train.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np
import pytest
import torch
from conftest import as_version_4

from attncache import AttncacheError, CacheFormatError, open_cache
from attncache.store import base as store_base
from attncache.store.format import seal
from attncache.tools.verify import verify_cache


def _crc(data: bytes) -> bytes:
    return google_crc32c.value(data).to_bytes(4, "little")


def _everything(root: Path):
    cache = open_cache(str(root))
    cache.check_records()
    return cache.read_rows(list(range(len(cache))))


def _one_line(exc: BaseException) -> None:
    assert "\n" not in str(exc) and len(str(exc)) < 600, str(exc)


# ---------------------------------------------------------------------------------------------------------------
# flipped bytes: never a silently different map


def _chunk_spans(root: Path) -> dict[str, list[tuple[int, int]]]:
    """{shard file: [(start, end) of bytes the readers decode]} (every chunk's bytes; zarr: also its index)."""
    cache = open_cache(str(root))
    spans: dict[str, list[tuple[int, int]]] = {}
    m = cache.manifest
    if m["store"]["format"] == "zarr":
        for shard in m["store"]["shards"]:
            for f in shard["files"]:
                spans[f["path"]] = [(0, f["bytes"])]  # chunks back to back, then the index and its crc
    else:
        for shard in m["store"]["shards"]:
            rel = shard["files"][0]["path"]
            with tarfile.open(root / rel) as tar:
                spans[rel] = [(t.offset_data, t.offset_data + t.size) for t in tar if t.name.endswith(".maps")]
    return spans


@pytest.fixture(params=["inline", "pool"])
def decode_on(request, monkeypatch):
    """Chunks decode in the reading thread, or (any size) on the reader's decode pool."""
    if request.param == "pool":
        monkeypatch.setattr(store_base, "POOL_MIN_BYTES", 0)
        monkeypatch.setattr(store_base, "default_codec_threads", lambda: 3)
    return request.param


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_flipped_bytes_at_random_offsets_are_detected_on_the_read_path(request, fmt, decode_on):
    root = request.getfixturevalue(f"{fmt}_copy")
    good = _everything(root)
    spans = _chunk_spans(root)
    rng = random.Random(1234)
    files = sorted(spans)
    in_data = detected = 0
    for _ in range(80):
        rel = rng.choice(files)
        path = root / rel
        original = path.read_bytes()
        offset = rng.randrange(len(original))
        flipped = bytearray(original)
        flipped[offset] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(flipped))
        inside = any(a <= offset < b for a, b in spans[rel])
        in_data += inside
        try:
            maps = _everything(root)
        except CacheFormatError as exc:
            _one_line(exc)
            assert rel in str(exc)  # names the shard (and the record, for a chunk)
            detected += 1
        else:
            # untouched by the readers (a tar header's padding, a record's .json): the very same maps
            assert not inside and torch.equal(maps, good), (rel, offset)
        finally:
            path.write_bytes(original)
    assert in_data >= 15 and detected >= in_data  # every flip in decoded bytes was caught: 100 %
    with pytest.raises(CacheFormatError):  # verify --quick sees them too (no sha256 of the shards needed)
        path = root / files[0]
        data = bytearray(path.read_bytes())
        data[spans[files[0]][0][0] + 20] ^= 0x10
        path.write_bytes(bytes(data))
        verify_cache(str(root), quick=True)


def test_flipped_byte_error_names_the_record(zarr_copy, decode_on):
    shard = zarr_copy / "maps/c/1/0/0/0/0"
    data = bytearray(shard.read_bytes())
    data[40] ^= 0x01  # inside record 5's chunk (the first of shard 1)
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheFormatError, match=r"maps/c/1/0/0/0/0 record 5: checksum mismatch"):
        open_cache(str(zarr_copy)).read_rows([5])
    assert open_cache(str(zarr_copy)).read_rows([0, 4]).shape[0] == 2  # the other shards still read
    # in a batch, among good chunks before and after it; with a second damaged record, the one read first (the
    # batch's shards in order, each by offset) is named, whichever thread finished first
    with pytest.raises(CacheFormatError, match=r"record 5: checksum mismatch"):
        open_cache(str(zarr_copy)).read_rows([0, 1, 5, 6, 2])
    data = bytearray((zarr_copy / "maps/c/0/0/0/0/0").read_bytes())
    data[40] ^= 0x01  # record 0's chunk
    (zarr_copy / "maps/c/0/0/0/0/0").write_bytes(bytes(data))
    for rows, named in (([6, 5, 7, 0], 5), ([1, 0, 6, 5], 0)):
        with pytest.raises(CacheFormatError, match=rf"record {named}: checksum mismatch"):
            open_cache(str(zarr_copy)).read_rows(rows)


# ---------------------------------------------------------------------------------------------------------------
# decompression bombs: refused from the header, before any allocation


def _bomb(declared_mb: int = 64) -> bytes:
    """A genuine blosc frame of zeros: a few KB that decompress to `declared_mb` MB."""
    return bytes(numcodecs.Blosc(cname="zstd", clevel=9).encode(np.zeros(declared_mb << 20, dtype=np.uint8)))


def test_blosc_bomb_in_a_wds_member_is_refused_before_allocating(wds_copy):
    bomb = _bomb()
    assert len(bomb) < 1 << 20
    tar_path = wds_copy / "shards/shard-000000.tar"
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as out:
        for m, data in members:
            if m.name == "0000000001.maps":
                data = bomb + _crc(bomb)  # a valid checksum: the forger knows the format
                m.size = len(data)
            out.addfile(m, io.BytesIO(data))
    tar_path.write_bytes(buf.getvalue())
    cache = open_cache(str(wds_copy))
    tracemalloc.start()
    with pytest.raises(CacheFormatError, match="blosc header declares 67108864 bytes") as info:
        cache.read_rows([1])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    _one_line(info.value)
    assert peak < 8 << 20, peak  # the 64 MB were never allocated


def test_blosc_bomb_in_a_zarr_chunk_is_refused_before_allocating(zarr_copy):
    """The chunk's header claims 2 GiB; the shard index and the chunk's crc32c are forged to agree."""
    shard = zarr_copy / "maps/c/0/0/0/0/0"
    data = bytearray(shard.read_bytes())
    index = np.frombuffer(bytes(data[-(5 * 16 + 4):-4]), dtype="<u8").reshape(5, 2)
    offset, length = (int(v) for v in index[0])
    frame = bytearray(data[offset:offset + length - 4])
    frame[4:8] = (1 << 31).to_bytes(4, "little")
    data[offset:offset + length] = bytes(frame) + _crc(bytes(frame))
    shard.write_bytes(bytes(data))
    cache = open_cache(str(zarr_copy))
    tracemalloc.start()
    with pytest.raises(CacheFormatError, match="record 0: blosc header declares 2147483648 bytes"):
        cache.read_rows([0])
    assert tracemalloc.get_traced_memory()[1] < 8 << 20
    tracemalloc.stop()


# ---------------------------------------------------------------------------------------------------------------
# the files themselves: links, devices, FIFOs, tar members that are not files


def test_shard_files_that_are_not_regular_files_inside_the_cache(zarr_copy, tmp_path):
    shard = zarr_copy / "maps/c/1/0/0/0/0"
    outside = tmp_path / "outside"
    outside.write_bytes(shard.read_bytes())
    cases = {
        "symlink out": lambda: shard.symlink_to(outside),
        "dev/zero": lambda: shard.symlink_to("/dev/zero"),
        "fifo": lambda: os.mkfifo(shard),
    }
    for name, make in cases.items():
        shard.unlink()
        make()
        with pytest.raises(CacheFormatError) as info:  # a FIFO must not hang: the test would time out
            open_cache(str(zarr_copy)).read_rows([5])
        _one_line(info.value)
        assert "maps/c/1/0/0/0/0" in str(info.value), name
        assert "outside the cache" in str(info.value) or "not a regular file" in str(info.value), name
    shard.unlink()
    shard.write_bytes(outside.read_bytes())
    assert open_cache(str(zarr_copy)).read_rows([5]).shape[0] == 1


def test_tar_members_that_are_links_devices_or_escapes_are_never_followed(wds_copy, tmp_path):
    """Symlink, hardlink, device and `../` members: the reader only ever reads regular members by offset,
    extracts nothing, and a record whose field is such a member is missing."""
    tar_path = wds_copy / "shards/shard-000000.tar"
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else b"") for m in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as out:
        for m, data in members:
            if m.name == "0000000001.maps":
                link = tarfile.TarInfo("0000000001.maps")
                link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
                out.addfile(link)
                continue
            if m.name == "0000000002.maps":
                hard = tarfile.TarInfo("0000000002.maps")
                hard.type, hard.linkname = tarfile.LNKTYPE, "0000000000.maps"
                out.addfile(hard)
                continue
            if m.name == "0000000003.maps":
                dev = tarfile.TarInfo("0000000003.maps")
                dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 5  # /dev/zero
                out.addfile(dev)
                escape = tarfile.TarInfo("../../escape.maps")
                escape.size = 4
                out.addfile(escape, io.BytesIO(b"evil"))
                continue
            out.addfile(m, io.BytesIO(data))
    tar_path.write_bytes(buf.getvalue())
    before = set(tmp_path.rglob("*"))
    cache = open_cache(str(wds_copy))
    assert cache.read_rows([0, 4]).shape[0] == 2
    for row in (1, 2, 3):
        with pytest.raises(CacheFormatError, match=f"member {row:010d}.maps missing"):
            cache.read_rows([row])
    assert set(tmp_path.rglob("*")) == before  # nothing extracted, nothing written
    assert not (wds_copy.parent.parent / "escape.maps").exists()


# ---------------------------------------------------------------------------------------------------------------
# manifests: values that validate but mean nothing, edits, lies


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def test_a_changed_codec_parameter_is_caught_by_the_manifest_digest(tmp_path, tiny_teacher, image_folder):
    from attncache.extract import extract

    out = tmp_path / "logq"
    extract(tiny_teacher.config(image_folder, out, codec="logq", codec_params={"bits": 6}))
    text = (out / "manifest.json").read_text()
    assert '"bits": 6' in text
    (out / "manifest.json").write_text(text.replace('"bits": 6', '"bits": 7'))  # decodes to other maps if read
    with pytest.raises(CacheFormatError, match="content_sha256 does not match the manifest's content"):
        open_cache(str(out))


@pytest.mark.parametrize("edit", [
    lambda t: t.replace('"mean": [', '"mean": [NaN, ', 1).replace(', 0.406]', ']', 1),
    lambda t: t.replace('"interpolation": "bicubic"', '"interpolation": "bilinear", "interpolation": "bicubic"', 1),
    lambda t: t.replace('"crop_pct": 0.875', '"crop_pct": Infinity', 1),
])
def test_nan_infinity_and_duplicate_keys_are_refused(wds_copy, edit):
    path = wds_copy / "manifest.json"
    edited = edit(path.read_text())
    assert edited != path.read_text()
    path.write_text(edited)
    with pytest.raises(CacheFormatError, match="manifest.json: (duplicate key|NaN|Infinity)") as info:
        open_cache(str(wds_copy))
    _one_line(info.value)


@pytest.mark.parametrize(("where", "value", "match"), [
    (("capture", "map_shape"), None, "capture.map_shape"),
    (("store", "records"), 10**9, "store.records"),
    (("dataset", "num_samples"), 10**9, "store.records"),
])
def test_lying_shapes_and_counts_even_when_resealed(wds_copy, where, value, match):
    m = _manifest(wds_copy)
    if where == ("capture", "map_shape"):  # a giant teacher: every geometry field agrees, the size does not
        m["teacher"].update(num_heads=256, embed_dim=256 * 64, num_tokens=4097, image_size=512, patch_size=8)
        m["teacher"]["model_args"].update(num_heads=256, embed_dim=256 * 64, patch_size=8)
        m["capture"]["map_shape"] = [2, 256, 4097, 4097]
    else:
        m[where[0]][where[1]] = value
    (wds_copy / "manifest.json").write_text(json.dumps(seal(m)))
    with pytest.raises(CacheFormatError, match=match) as info:
        open_cache(str(wds_copy))
    _one_line(info.value)


def test_a_student_too_large_for_the_machine_is_refused_before_it_is_built(tmp_path, folder_fp16_zarr,
                                                                          image_folder):
    """A cache whose teacher claims embed_dim 16384: the student (the teacher's architecture) is sized on the
    meta device and refused in one line; peak memory stays small (measured in a fresh process)."""
    from conftest import TINY_VIT  # noqa: F401 - the tiny teacher's layout, for reference

    root = tmp_path / "big"
    shutil.copytree(folder_fp16_zarr, root)
    m = _manifest(root)
    m["teacher"]["embed_dim"] = 16384
    m["teacher"]["model_args"]["embed_dim"] = 16384
    m["teacher"]["num_heads"] = 4
    (root / "manifest.json").write_text(json.dumps(seal(m)))
    script = (
        "import resource, sys\n"
        "from attncache.train import TrainConfig, train\n"
        "from attncache import AttncacheError\n"
        f"cfg = TrainConfig(mode='distill', out={str(tmp_path / 'run')!r}, cache={str(root)!r}, "
        f"data={str(image_folder)!r}, epochs=1, batch_size=2, workers=0, progress=False)\n"
        "try:\n    train(cfg)\nexcept AttncacheError as exc:\n    print('ERR', exc)\n"
        "print('RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    err = next(line for line in out.stdout.splitlines() if line.startswith("ERR"))
    assert "parameters: more than this machine can train" in err, err
    rss_kb = int(out.stdout.split("RSS_KB")[1])
    assert rss_kb < 1_500_000, rss_kb  # torch + timm imported, nothing of the 10^10-parameter model allocated


def test_swapped_index_lines_are_caught_by_their_sha256(wds_copy):
    """Version 4's JSONL files (version 5's tables: test_tables.py)."""
    as_version_4(wds_copy)
    for name in ("samples.jsonl", "views.jsonl"):
        path = wds_copy / name
        original = path.read_bytes()
        lines = original.splitlines(keepends=True)
        path.write_bytes(b"".join([lines[1], lines[0], *lines[2:]]))
        cache = open_cache(str(wds_copy))
        with pytest.raises(CacheFormatError, match=f"{name}: does not match the size and sha256"):
            cache.check_records()
        path.write_bytes(original)


def test_truncated_shards_are_named(zarr_copy, wds_copy):
    for root, rel, row in ((zarr_copy, "maps/c/1/0/0/0/0", 5), (wds_copy, "shards/shard-000001.tar", 5)):
        path = root / rel
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        with pytest.raises(CacheFormatError, match=rel) as info:
            open_cache(str(root)).read_rows([row, row + 4])
        _one_line(info.value)
        with pytest.raises(CacheFormatError, match=rel):
            verify_cache(str(root), quick=True)


def test_attacks_through_the_cli_are_one_line_errors(zarr_copy):
    from attncache_cli.main import app
    from typer.testing import CliRunner

    shard = zarr_copy / "maps/c/0/0/0/0/0"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0x04
    shard.write_bytes(bytes(data))
    for args in (["verify", str(zarr_copy), "--quick"], ["verify", str(zarr_copy)]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "maps/c/0/0/0/0/0" in r.stderr, r.output
        assert "Traceback" not in r.output


def test_unsafe_options_never_reach_an_error_as_a_traceback():
    with pytest.raises(AttncacheError, match="`storage_option`"):
        open_cache("/nonexistent", {"retries": "many"})

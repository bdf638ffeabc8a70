"""The fast tar walk lists what Python's tarfile lists (every tar format tarfile writes, long names, links and
folders), damaged headers are one line naming the shard, and a shard's listing is kept once per node: later
processes map it instead of walking the tar, a changed shard is walked again, a torn memo is ignored."""

from __future__ import annotations

import io
import os
import shutil
import tarfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attncache.errors import AttncacheError
from attncache.sources import WebDatasetSource, tar_index
from attncache.sources.tar_index import Damaged, local_reader, walk

FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}


def _tar(path, members, fmt) -> str:
    """members: (name, payload bytes | "dir" | "link")."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            if payload == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif payload == "link":
                info.type, info.linkname = tarfile.SYMTYPE, "elsewhere.jpg"
                tar.addfile(info)
            else:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return str(path)


def _reference(path) -> list[tuple[str, int, int]]:
    with tarfile.open(path, "r:") as tar:
        return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]


def _walked(path) -> list[tuple[str, int, int]]:
    read_at, size, close = local_reader(path)
    try:
        return list(walk(read_at, size))
    finally:
        close()


NAMES = st.text(st.characters(min_codepoint=48, max_codepoint=0x24F, blacklist_characters="/\\"), min_size=1,
                max_size=30)


@settings(max_examples=30, deadline=None)
@given(fmt=st.sampled_from(sorted(FORMATS)), members=st.lists(st.tuples(
    st.lists(NAMES, min_size=1, max_size=8).map("/".join),  # up to ~250 characters: long names in every format
    st.one_of(st.binary(max_size=1200), st.sampled_from(["dir", "link"]))), max_size=12))
def test_the_walk_lists_what_tarfile_lists(tmp_path_factory, fmt, members):
    if fmt == "ustar":  # ustar cannot hold non-ASCII or over-long names at all: tarfile refuses to write them
        members = [(n.encode("ascii", "ignore").decode() or "x", p) for n, p in members]
        members = [(n[-99:], p) for n, p in members]
    path = tmp_path_factory.mktemp("tars") / "t.tar"
    _tar(path, members, FORMATS[fmt])
    assert _walked(path) == _reference(path)


def test_a_damaged_header_is_one_line_naming_the_shard(tmp_path):
    path = _tar(tmp_path / "s.tar", [("a.jpg", b"x" * 700), ("a.cls", b"3"), ("b.jpg", b"y" * 10)], tarfile.GNU_FORMAT)
    data = bytearray(open(path, "rb").read())
    data[1536 + 10] ^= 0x41  # the second member's name: its header checksum no longer matches
    open(path, "wb").write(bytes(data))
    with pytest.raises(Damaged, match="bad header checksum at byte 1536"):
        _walked(path)
    with pytest.raises(AttncacheError, match=r"^`data` .*s\.tar: cannot read webdataset shard \(bad header checksum"):
        WebDatasetSource(path).entries()


def test_a_truncated_member_is_named(tmp_path):
    path = _tar(tmp_path / "s.tar", [("a.jpg", b"x" * 5000)], tarfile.GNU_FORMAT)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:3000])
    with pytest.raises(AttncacheError, match="runs past the end of the file"):
        WebDatasetSource(path).entries()


def test_the_source_index_equals_a_tarfile_listing(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNCACHE_MIRROR_DIR", str(tmp_path / "node"))
    shards = []
    for s in range(3):
        members = []
        for i in range(20):
            key = f"class{i % 4}/{'long' * 30 if i % 7 == 0 else ''}img{s}_{i}"
            members += [(f"{key}.jpg", os.urandom(100 + i)), (f"{key}.cls", str(i % 4).encode())]
        members.insert(5, ("a_folder", "dir"))
        shards.append(_tar(tmp_path / f"shard-{s}.tar", members, tarfile.PAX_FORMAT if s else tarfile.GNU_FORMAT))
    source = WebDatasetSource(f"{tmp_path}/shard-{{0..2}}.tar")
    expected = []
    for path in shards:
        for name, offset, size in _reference(path):
            if name.endswith(".jpg"):
                expected.append((name[:-4], f"{path}:{offset}:{size}"))
    assert [(e.key, e.stamp) for e in source.entries()] == expected
    assert [e.label for e in source.entries()] == [i % 4 for _ in range(3) for i in range(20)]
    key = expected[45][0]
    with tarfile.open(shards[2]) as tar:
        assert source.read_key(key) == tar.extractfile(f"{key}.jpg").read()


def test_a_shard_is_walked_once_per_node_and_again_when_it_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNCACHE_MIRROR_DIR", str(tmp_path / "node"))
    path = _tar(tmp_path / "s.tar", [("a.jpg", b"1" * 10), ("a.cls", b"1"), ("b.jpg", b"2" * 20)], tarfile.GNU_FORMAT)
    walks = []
    real_walk = tar_index.walk

    def counting_walk(read_at, size):
        walks.append(size)
        yield from real_walk(read_at, size)

    monkeypatch.setattr("attncache.sources.webdataset.walk", counting_walk)
    first = [(e.key, e.label, e.stamp) for e in WebDatasetSource(path).entries()]
    again = [(e.key, e.label, e.stamp) for e in WebDatasetSource(path).entries()]  # another process, same node
    assert first == again == [("a", 1, f"{path}:512:10"), ("b", -1, f"{path}:2560:20")]
    assert len(walks) == 1

    (whole,) = [p for p in (tmp_path / "node" / "wds-index").glob("all-*") if p.is_dir()]  # mapped by both
    assert WebDatasetSource(path)._index_folder() == whole
    shutil.rmtree(whole)  # without it, the shards' listings are read again
    memo = next((tmp_path / "node" / "wds-index").glob("*.npz"))
    memo.write_bytes(memo.read_bytes()[:100])  # torn: ignored, walked again
    assert [(e.key, e.label) for e in WebDatasetSource(path).entries()] == [("a", 1), ("b", -1)]
    assert len(walks) == 2

    _tar(path, [("c.jpg", b"3" * 30), ("c.cls", b"7")], tarfile.GNU_FORMAT)  # the shard changed
    os.utime(path, ns=(1, 1))
    assert [(e.key, e.label) for e in WebDatasetSource(path).entries()] == [("c", 7)]
    assert len(walks) == 3


def test_a_read_only_node_folder_still_lists(tmp_path, monkeypatch):
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    monkeypatch.setenv("ATTNCACHE_MIRROR_DIR", str(blocked))
    path = _tar(tmp_path / "s.tar", [("a.jpg", b"1" * 10)], tarfile.GNU_FORMAT)
    assert [e.key for e in WebDatasetSource(path).entries()] == ["a"]


def test_unusual_headers_fall_back_to_tarfile(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNCACHE_MIRROR_DIR", str(tmp_path / "node"))
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("a.jpg")
        info.size, info.pax_headers = 4, {"size": "4"}  # a pax size record: the walk leaves it to tarfile
        tar.addfile(info, io.BytesIO(b"abcd"))
    source = WebDatasetSource(str(path))
    assert [e.key for e in source.entries()] == ["a"] and source.read_key("a") == b"abcd"
    assert np.asarray(source._index().members["size"]).tolist() == [4]


def test_the_ranks_of_a_node_map_one_whole_index(tmp_path, monkeypatch):
    """Issue 22: each training process (8 ranks per node) built its own index of the source from the shards'
    listings (1.5 s and 94 MB for ImageNet, each). The first builds it beside the listings; the others, their
    loader workers and later runs map that folder and list nothing."""
    import pickle

    from attncache.sources import webdataset

    monkeypatch.setenv("ATTNCACHE_MIRROR_DIR", str(tmp_path / "node"))
    urls = [_tar(tmp_path / f"s{i}.tar", [(f"k{i}_{j}.jpg", bytes([j]) * 9) for j in range(3)], tarfile.GNU_FORMAT)
            for i in range(2)]
    spec = str(tmp_path / "s{0..1}.tar")
    first = WebDatasetSource(spec)
    assert [e.key for e in first.entries()] == [f"k{i}_{j}" for i in range(2) for j in range(3)]

    def no_listing(self):
        raise AssertionError("listed again")

    monkeypatch.setattr(webdataset.WebDatasetSource, "_list_shards", no_listing)
    other = WebDatasetSource(spec)  # another rank of the node
    assert other.read_key("k1_2") == bytes([2]) * 9 and other._shared == first._shared
    worker = pickle.loads(pickle.dumps(other))
    assert worker.read_key("k0_1") == bytes([1]) * 9 and worker._shared == first._shared
    os.utime(urls[1], ns=(5, 5))  # a shard changed: its identity, and so the index's, is another
    monkeypatch.undo()
    monkeypatch.setenv("ATTNCACHE_MIRROR_DIR", str(tmp_path / "node"))
    changed = WebDatasetSource(spec)
    assert changed.key_hashes().size == 6 and changed._shared not in (None, first._shared)

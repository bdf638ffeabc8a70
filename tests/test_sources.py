"""Image sources: what a worker receives, how errors name an image, and re-scans that cost what changed."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile

import pytest
from conftest import image_bytes, make_image_folder

from attncache.errors import AttncacheError
from attncache.sources import FolderSource, WebDatasetSource, open_source


def _wds(path, images: dict[str, bytes]) -> str:
    with tarfile.open(path, "w") as tar:
        for i, (key, data) in enumerate(images.items()):
            for suffix, payload in (("png", data), ("cls", str(i % 2).encode())):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return str(path)


def test_webdataset_source_hands_workers_an_index_not_the_images(tmp_path):
    """Regression: a webdataset image source held every image's bytes once asked for one by key, and that dict
    rode in the pickled stream to every DataLoader worker. Now it keeps (shard, offset, size) per key and reads by
    offset: what a worker receives does not grow with the images' bytes."""
    images = {f"train/img_{i:03d}": image_bytes((160, 120), seed=i) for i in range(24)}  # ~1.4 MB of PNG
    url = _wds(tmp_path / "shard-000000.tar", images)
    source = open_source(url)
    assert isinstance(source, WebDatasetSource)
    for key in ("train/img_007", "train/img_023", "train/img_000"):
        assert source.read_key(key) == images[key]
    assert source.missing_keys(["train/img_001", "nope"]) == ["nope"]
    shipped = len(pickle.dumps(source))
    assert shipped < 16_000 < sum(map(len, images.values())) / 50, shipped
    clone = pickle.loads(pickle.dumps(source))  # a worker's copy reads the same bytes
    assert clone.read_key("train/img_011") == images["train/img_011"]
    assert [e.label for e in clone.entries()][:4] == [0, 1, 0, 1]


def test_a_pipe_source_says_it_cannot_be_read_by_key(tmp_path):
    url = _wds(tmp_path / "s.tar", {"a": image_bytes((20, 20))})
    source = open_source(f"pipe:cat {url}")
    assert [k for k, _ in [(e.key, e.label) for e in source.entries()]] == ["a"]
    assert list(source.iter_bytes([0]))[0][1] == image_bytes((20, 20))
    with pytest.raises(AttncacheError, match="a pipe: source has no random access"):
        source.read_key("a")


@pytest.mark.parametrize(("content", "reason"), [(b"not an image at all", "not a format Pillow recognises"),
                                               (image_bytes((40, 40))[:60], "")])
def test_decode_errors_name_the_file_not_a_python_object(tmp_path, content, reason):
    """Regression: image decode errors showed `<_io.BytesIO object at 0x...>` instead of the file."""
    folder = make_image_folder(tmp_path / "imgs")
    (folder / "bee" / "bad.png").write_bytes(content)
    with pytest.raises(AttncacheError) as info:
        FolderSource(folder).scan()
    message = str(info.value)
    assert message.startswith(f"{folder / 'bee' / 'bad.png'}: cannot decode image ({reason}")
    assert "BytesIO" not in message and " at 0x" not in message and "\n" not in message


def test_a_rescan_reads_only_the_images_that_changed(tmp_path, monkeypatch):
    """Regression (resume cost): every re-run decoded every image again on one thread before doing anything. A scan
    reuses an earlier scan's entry wherever the file's size and mtime are unchanged."""
    folder = make_image_folder(tmp_path / "imgs")
    source = FolderSource(folder)
    first = source.scan()
    known = {s.key: {**s.to_json(), "stamp": e.stamp} for s, e in zip(first, source.entries(), strict=True)}
    (folder / "cat" / "c1.png").write_bytes(image_bytes((30, 20), seed=99))  # one image changed
    read = []
    original = FolderSource.read_index
    monkeypatch.setattr(FolderSource, "read_index", lambda self, i: read.append(i) or original(self, i))
    again = FolderSource(folder).scan(known=known)
    assert read == [5]  # only cat/c1.png (sorted: ant a0 a1, bee b0 b1, cat c0 c1)
    assert again[:5] == first[:5] and (again[5].width, again[5].height) == (30, 20)


def _scan_peak_bytes(tmp_path, images: int) -> int:
    """Peak traced memory of `scan_rows` over a webdataset shard of `images` tiny PNGs (listing done first)."""
    import tracemalloc

    one = image_bytes((4, 4), seed=0)
    source = open_source(_wds(tmp_path / f"scan-{images}.tar", {f"k/{i:07d}": one for i in range(images)}))
    source.entries()  # the listing (the source's own arrays) is not the scan's memory
    tracemalloc.start()
    try:
        rows = source.scan_rows(workers=2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(rows) == images and rows[images - 1]["key"] == f"k/{images - 1:07d}"
    assert rows[7]["sha256"] == hashlib.sha256(one).hexdigest() and (rows[7]["width"], rows[7]["height"]) == (4, 4)
    return peak


def test_a_scan_holds_table_rows_not_a_python_object_per_image(tmp_path):
    """Issue 22 (extraction at scale): rank 0's scan kept a `Sample`, its dict and a pool future per image
    (~2.3 KB per image measured at 125k images: ~3 GB for ImageNet's 1.28M). It now keeps the samples table's rows
    (54 bytes and the key per image) and at most a window of images in flight, so its peak memory grows by little
    more than the rows."""
    small, large = _scan_peak_bytes(tmp_path, 2_000), _scan_peak_bytes(tmp_path, 8_000)
    per_image = (large - small) / 6_000
    assert per_image < 200, f"{per_image:.0f} B per image"


def test_a_webdataset_listing_gives_its_key_hashes_sorted(tmp_path):
    """What a cache's keys are checked against before training (train.loader.check_images): the listing's own
    key index, the cache format's key hash of every key, sorted."""
    from attncache.store.records import key_hash

    keys = [f"train/img_{i:03d}" for i in (5, 1, 9, 3)]
    source = open_source(_wds(tmp_path / "shard.tar", {k: image_bytes((8, 8), seed=i) for i, k in enumerate(keys)}))
    assert source.key_hashes().tolist() == sorted(key_hash(k) for k in keys)

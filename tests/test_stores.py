"""Both store formats hold the same bytes, readable with plain zarr / tarfile / webdataset as docs/format.md says."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import torch
import zarr
from conftest import FOLDER_IMAGES

from attncache import open_cache
from attncache.sources import open_source


def test_zarr_and_wds_fp16_round_trip_bit_exactly(folder_fp32_zarr, folder_fp16_zarr, folder_fp16_wds):
    rows = list(range(12))
    z, w = open_cache(str(folder_fp16_zarr)), open_cache(str(folder_fp16_wds))
    assert z.manifest["store"]["format"] == "zarr" and w.manifest["store"]["format"] == "wds"
    from_zarr, from_wds = z.read_rows(rows), w.read_rows(rows)
    assert torch.equal(from_zarr, from_wds)
    assert torch.equal(from_wds, open_cache(str(folder_fp32_zarr)).read_rows(rows).half().float())
    # row-by-row and out-of-order access agree with the bulk read in both formats
    for cache in (z, w):
        assert torch.equal(cache.read_rows([11, 3, 7]), from_zarr[[11, 3, 7]])
        assert torch.equal(cache[5].maps, from_zarr[5])
    assert [z.view_json(r) for r in range(len(z))] == [w.view_json(r) for r in range(len(w))]


def test_zarr_cache_is_plain_zarr_v3(folder_fp16_zarr):
    cache = open_cache(str(folder_fp16_zarr))
    group = zarr.open_group(str(folder_fp16_zarr), mode="r")
    maps = group["maps"]
    assert maps.shape == (12, 2, 4, 17, 17) and maps.dtype == np.float16
    assert maps.chunks == (1, 2, 4, 17, 17) and maps.shards == (5, 2, 4, 17, 17)
    meta = json.loads((folder_fp16_zarr / "maps" / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["codecs"][0]["name"] == "sharding_indexed"
    for row in (0, 7, 11):
        assert torch.equal(torch.from_numpy(maps[row]).float(), cache[row].maps)


def _tar_members(path) -> dict[str, tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return {m.name: (m, tar.extractfile(m).read()) for m in tar.getmembers()}


def test_wds_shards_follow_the_spec(folder_fp16_wds, image_folder):
    m = json.loads((folder_fp16_wds / "manifest.json").read_text())
    cache = open_cache(str(folder_fp16_wds))
    fields = m["codec"]["fields"]["maps"]
    seen_rows = []
    for shard in m["store"]["shards"]:
        (f,) = shard["files"]
        assert f["path"] == f"shards/shard-{shard['index']:06d}.tar"
        members = _tar_members(folder_fp16_wds / f["path"])
        rows = range(shard["first_record"], shard["first_record"] + shard["records"])
        ext = {r: cache.sample_at(r % 6)["key"].rsplit(".", 1)[1] for r in rows}
        assert sorted(members) == sorted(f"{r:010d}.{e}" for r in rows for e in ("json", "maps", ext[r]))
        for info, _ in members.values():
            assert (info.mtime, info.uid, info.gid, info.mode) == (0, 0, 0, 0o644)
        for r in rows:
            seen_rows.append(r)
            sample = cache.sample_at(r % 6)
            meta = json.loads(members[f"{r:010d}.json"][1])
            view = cache.view(r)
            assert meta == {"key": sample["key"], "view": r // 6, "label": sample["label"],
                            "sha256": sample["sha256"], "box": list(view.box), "flip": view.flip}
            # the embedded image is the source file, byte for byte
            image = members[f"{r:010d}.{ext[r]}"][1]
            assert image == (image_folder / sample["key"]).read_bytes()
            assert hashlib.sha256(image).hexdigest() == sample["sha256"]
            # the field is blosc over raw little-endian fp16 bytes, decodable with numcodecs alone
            raw = numcodecs.get_codec(m["codec"]["compressor"]).decode(members[f"{r:010d}.maps"][1])
            arr = np.frombuffer(raw, dtype="<f2").reshape(fields["shape"])
            assert torch.equal(torch.from_numpy(arr.astype(np.float32)), cache[r].maps)
    assert seen_rows == list(range(12))


def test_wds_shards_stream_with_webdataset(folder_fp16_wds, image_folder):
    import webdataset as wds

    cache = open_cache(str(folder_fp16_wds))
    urls = [str(folder_fp16_wds / s["files"][0]["path"]) for s in cache.manifest["store"]["shards"]]
    records = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [r["__key__"] for r in records] == [f"{i:010d}" for i in range(12)]
    for i, r in enumerate(records):
        key = json.loads(r["json"])["key"]
        assert key == cache.sample_at(i % 6)["key"]
        assert r[key.rsplit(".", 1)[1]] == (image_folder / key).read_bytes()


def test_grayscale_source_is_embedded_verbatim(folder_fp16_wds, image_folder):
    """The embedded bytes are the encoded source (no re-encoding): a grayscale PNG stays grayscale."""
    from PIL import Image

    cache = open_cache(str(folder_fp16_wds))
    gray = next(f"{c}/{n}" for c, n, _, mode, _ in FOLDER_IMAGES if mode == "L")
    row = cache.row(gray, 1)
    shard = row // cache.manifest["store"]["records_per_shard"]
    members = _tar_members(folder_fp16_wds / f"shards/shard-{shard:06d}.tar")
    data = members[f"{row:010d}.png"][1]
    assert Image.open(io.BytesIO(data)).mode == "L"
    assert data == (image_folder / gray).read_bytes()


def test_webdataset_source_with_embedded_images(tmp_path, tiny_teacher):
    """Images read from webdataset tars (keys without extension, labels in .cls) embed under their format's
    extension, so the cache itself streams with webdataset like an image dataset."""
    import webdataset as wds
    from conftest import image_bytes

    from attncache.extract import extract

    src = tmp_path / "src-000000.tar"
    images = {}
    with tarfile.open(src, "w") as tar:
        for i, (fmt, ext) in enumerate([("PNG", "png"), ("JPEG", "jpg"), ("PNG", "png")]):
            key = f"train/n0{i}_sample_{i}"  # a directory part, as real webdataset keys have
            images[key] = image_bytes((30 + 4 * i, 36), "RGB", fmt, seed=i)
            for suffix, data in ((ext, images[key]), ("cls", str(i % 2).encode())):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "cache"
    m = extract(tiny_teacher.config(str(src), out, format="wds", embed_images=True, layers="0"))
    assert m["dataset"]["source"] == f"webdataset:{src}" and m["store"]["records"] == 3
    cache = open_cache(str(out))
    got = [(s["key"], s["label"]) for s in map(cache.sample_at, range(3))]
    assert got == [(k, i % 2) for i, k in enumerate(images)]
    records = list(wds.WebDataset(str(out / "shards/shard-000000.tar"), shardshuffle=False, empty_check=False))
    assert [r["__key__"] for r in records] == ["0000000000", "0000000001", "0000000002"]
    for r, (key, data), ext in zip(records, images.items(), ["png", "jpg", "png"], strict=True):
        assert json.loads(r["json"])["key"] == key
        assert r[ext] == data
        assert {k for k in r if not k.startswith("__")} == {"json", "maps", ext}


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_storage_options_reach_every_reader(request, tmp_path, fmt, image_folder):
    """Regression: storage options reached the manifest but not the shard readers, nor the loader's workers
    (which reopened the cache by its URL alone). fsspec's `dir://` filesystem cannot resolve a path without
    its options, like an object store without its credentials: every read, in every process, must carry them."""
    from attncache import AttncacheError
    from attncache.tools.verify import verify_cache
    from attncache.train import TrainConfig, train
    from attncache.train.loader import RenderSpec, ViewStream, batches, make_loader

    local_dir = request.getfixturevalue(f"folder_fp16_{fmt}")
    url, options = f"dir://{local_dir.name}", {"path": str(local_dir.parent), "target_protocol": "file"}
    with pytest.raises(AttncacheError, match=f"^{url}: cannot open"):
        open_cache(url)
    remote, local = open_cache(url, options), open_cache(str(local_dir))
    rows = list(range(len(local)))
    assert torch.equal(remote.read_rows(rows), local.read_rows(rows))
    assert verify_cache(url, options)["records"] == 12

    def streamed(cache):
        s = ViewStream(cache=cache, render_spec=RenderSpec.of(cache.teacher), batch_size=2, shuffle=True,
                       source=open_source(str(image_folder)) if fmt == "zarr" else None)
        s.set_position(1)
        return [(b["rows"].tolist(), b["fields"]["maps"]) for b in batches(make_loader(s, workers=2))]

    for (r1, f1), (r2, f2) in zip(streamed(remote), streamed(local), strict=True):
        assert r1 == r2 and torch.equal(f1, f2)
    common = dict(mode="distill", data=str(image_folder), epochs=1, batch_size=2, workers=2, progress=False)
    via_url = train(TrainConfig(cache=url, storage_options=options, out=str(tmp_path / "url"), **common))
    assert via_url == train(TrainConfig(cache=str(local_dir), out=str(tmp_path / "local"), **common))


def test_caches_written_by_attncache_0_2_still_read(tmp_path):
    """tests/data/cache_v1: a tiny plain train cache as attncache 0.2.0 wrote it (format version 1: no per-chunk
    checksums, no content_sha256), in both stores, and the maps 0.2.0 decoded from it (exact in fp16)."""
    import shutil

    from attncache.tools.copy import copy_cache
    from attncache.tools.verify import verify_cache

    data = Path(__file__).parent / "data" / "cache_v1"
    expected = torch.from_numpy(np.load(data / "maps_fp16.npy").astype(np.float32))
    for fmt in ("zarr", "wds"):
        root = tmp_path / fmt
        shutil.copytree(data / fmt, root)
        cache = open_cache(str(root))
        assert cache.manifest["version"] == 1 and "content_sha256" not in cache.manifest
        assert torch.equal(cache.read_rows(list(range(len(cache)))), expected)
        assert verify_cache(str(root))["files"] > 0
        assert verify_cache(str(root), quick=True)["chunks_checked"] == 0  # version 1 has none to check
        copy_cache(str(root), str(tmp_path / f"{fmt}_copy"))  # copied as it is, still version 1
        assert (tmp_path / f"{fmt}_copy" / "manifest.json").read_bytes() == (root / "manifest.json").read_bytes()


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_pooled_decoding_reads_the_same_numbers(monkeypatch, folder_fp16_zarr, folder_fp16_wds, fmt):
    """Chunks decoded on the reader's thread pool, straight into the batch's array, are the ones the reading
    thread decodes, for runs, random batches, repeats and single rows; and the pool is really used."""
    from attncache.store import base

    root = {"zarr": folder_fp16_zarr, "wds": folder_fp16_wds}[fmt]
    inline = open_cache(str(root))
    inline.reader.threads = 1
    batches = [list(range(12)), [11, 3, 7, 0, 5], [4, 4, 9], [6]]
    expected = [inline.read_rows(rows) for rows in batches]
    monkeypatch.setattr(base, "POOL_MIN_BYTES", 0)
    pooled = open_cache(str(root))
    pooled.reader.threads = 3
    threads = set()
    decode = pooled.reader.decode_chunk

    def spy(*args):
        threads.add(threading.current_thread().name)
        return decode(*args)

    monkeypatch.setattr(pooled.reader, "decode_chunk", spy)
    for rows, maps in zip(batches, expected, strict=True):
        assert torch.equal(pooled.read_rows(rows), maps)
    assert any(name.startswith("attncache-codec") for name in threads)
    assert maps.abs().sum() > 0 and not torch.equal(expected[0][0], expected[0][1])  # real, distinct maps


@pytest.mark.parametrize("pooled", [False, True])
def test_zarr_shards_are_the_bytes_zarr_itself_writes(monkeypatch, tmp_path, folder_fp16_zarr, pooled):
    """attncache writes zarr shards itself (records compressed in parallel, one file per shard and field): for the
    same records, every shard file is byte for byte what zarr's own array writer makes from the same metadata,
    short last shard included, whether or not the records compressed on the pool."""
    from attncache.store import WRITERS, base
    from attncache.store.zarr_store import _create_arrays

    if pooled:
        monkeypatch.setattr(base, "POOL_MIN_BYTES", 0)
        monkeypatch.setattr(base, "default_codec_threads", lambda: 3)
    cache = open_cache(str(folder_fp16_zarr))
    m = cache.manifest
    fields = cache.reader.read(list(range(len(cache))))
    ours = tmp_path / "ours"
    writer = WRITERS["zarr"](ours, cache.reader.fields, m["codec"]["compressor"], len(cache),
                             m["store"]["records_per_shard"])
    per_shard = m["store"]["records_per_shard"]
    for shard in range(len(m["store"]["shards"])):
        rows = slice(shard * per_shard, min(len(cache), (shard + 1) * per_shard))
        writer.write_shard(shard, {k: v[rows] for k, v in fields.items()}, [{}] * (rows.stop - rows.start))
    theirs = tmp_path / "theirs"
    arrays = _create_arrays(zarr.storage.LocalStore(theirs), m["codec"]["fields"], m["codec"]["compressor"],
                            len(cache), per_shard, True)
    for name, values in fields.items():
        arrays[name][:] = values
    files = sorted(str(p.relative_to(theirs)) for p in theirs.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(ours)) for p in ours.rglob("*") if p.is_file())
    assert len([f for f in files if "/c/" in f]) == len(m["store"]["shards"]) == 3
    for f in files:
        assert (ours / f).read_bytes() == (theirs / f).read_bytes(), f
        if "/c/" in f:  # and the cache's own shards, written by the extraction, are these bytes too
            assert (ours / f).read_bytes() == (folder_fp16_zarr / f).read_bytes(), f


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_an_open_cache_keeps_its_shard_list_as_arrays(tmp_path, tiny_teacher, image_folder, fmt):
    """Issue 22: every process that opened a cache (the trainer and each loader worker) held the parsed JSON of
    every shard entry, and each worker parsed the manifest again from its bytes: ~40 MB and 0.3 s per process for
    the 20,000 shards of an ImageNet cache (measured: a tree of 8 workers grew by 650 MB from 50k to 5.12M
    records). An open cache keeps sizes and sha256 as arrays; a worker gets that compact form, which must grow by
    under 64 bytes per shard where the manifest grows by hundreds; and it reads and names files exactly as before."""
    import pickle

    from attncache.extract import extract

    def cache_of(per_shard: int):
        out = tmp_path / f"{fmt}-{per_shard}"
        extract(tiny_teacher.config(image_folder, out, views=8, codec="fp16", records_per_shard=per_shard,
                                    format=fmt, embed_images=fmt == "wds"))
        return open_cache(str(out))

    few, many = cache_of(8), cache_of(1)  # 6 and 48 shards of the same 48 records
    added = len(many.manifest["store"]["shards"]) - len(few.manifest["store"]["shards"])
    assert added == 42
    json_per_shard = (len(many.manifest_bytes) - len(few.manifest_bytes)) / added
    pickled_per_shard = (len(pickle.dumps(many)) - len(pickle.dumps(few))) / added
    assert json_per_shard > 200 and pickled_per_shard < 64, (json_per_shard, pickled_per_shard)

    manifest = json.loads(many.manifest_bytes)
    worker = pickle.loads(pickle.dumps(many))
    assert worker.manifest["store"]["shards"] == manifest["store"]["shards"]  # entry by entry, as spelled
    for entry in [f for s in manifest["store"]["shards"] for f in s["files"]] + manifest["store"]["metadata_files"]:
        assert worker.fs.known[entry["path"]] == entry
    assert "maps/c/48/0/0/0/0" not in worker.fs.known and "shards/shard-000048.tar" not in worker.fs.known
    rows = list(range(48))[::-1]
    assert torch.equal(worker.read_rows(rows), few.read_rows(rows))


def test_a_reader_keeps_a_bounded_number_of_shard_indexes(tmp_path, tiny_teacher, image_folder, monkeypatch):
    """A reader kept the index of every shard it had read: over an epoch of random reads a loader worker held the
    index of the whole cache (for a webdataset store a dict per record: ~1.5 GB at 5.12M records). It keeps the
    last SHARD_INDEXES_KEPT, and reads the same bytes whatever the bound."""
    from attncache.extract import extract
    from attncache.store import base

    out = tmp_path / "wds"
    extract(tiny_teacher.config(image_folder, out, views=4, codec="fp16", records_per_shard=2, format="wds",
                                embed_images=True))
    rows = np.random.default_rng(0).permutation(24).tolist()
    expected = open_cache(str(out)).read_rows(rows)
    monkeypatch.setattr(base, "SHARD_INDEXES_KEPT", 3)
    cache = open_cache(str(out))
    got = torch.stack([cache.read_rows([r])[0] for r in rows])
    assert torch.equal(got, expected) and len(cache.reader._shard_indexes) == 3

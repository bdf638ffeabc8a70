"""Sharing caches between labs, against real servers started on loopback: an HTTP server with Range support (and
one without), a fault-injecting proxy (503s, dropped connections, truncated bodies), and moto's S3 server."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from servers import Faults, S3Server, fault_proxy, static_server

from attncache import AttncacheError, CacheFormatError, open_cache
from attncache.cache import CacheFiles
from attncache.extract import extract
from attncache.store.format import named_files
from attncache.store.fs import CacheFS
from attncache.tools.copy import copy_cache
from attncache.tools.verify import verify_cache
from attncache.train import TrainConfig, train
from attncache.train.loader import RenderSpec, ViewStream, batches, make_loader

FAST = {"retries": 3, "backoff": 0.01}  # the tests' retry policy: quick back-off


@pytest.fixture(scope="module")
def served(tmp_path_factory, folder_fp16_zarr, folder_fp16_wds):
    """Both tiny caches under one HTTP server with Range support: {name: (local path, URL)}."""
    root = tmp_path_factory.mktemp("www")
    for name, src in (("zarr", folder_fp16_zarr), ("wds", folder_fp16_wds)):
        shutil.copytree(src, root / name)
    server = static_server(root)
    yield {name: (root / name, f"{server.url}/{name}") for name in ("zarr", "wds")}
    server.close()


@pytest.fixture(scope="module")
def s3():
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    server = S3Server()
    yield server
    server.close()


def s3_options(s3) -> dict:
    return {"key": "testing", "secret": "testing", "endpoint_url": s3.endpoint, **FAST}


def all_rows(cache) -> torch.Tensor:
    return cache.read_rows(list(range(len(cache))))


# ---------------------------------------------------------------------------------------------------------------
# reading over HTTPS


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_http_cache_reads_what_the_local_cache_holds(served, fmt):
    local, url = served[fmt]
    remote, here = open_cache(url, FAST), open_cache(str(local))
    assert torch.equal(all_rows(remote), all_rows(here))
    assert [remote.view_json(r) for r in range(len(remote))] == [here.view_json(r) for r in range(len(here))]
    assert verify_cache(url, FAST)["mode"] == "full"
    result = verify_cache(url, FAST, quick=True)
    assert result["chunks_checked"] == len(here) * len(here.manifest["codec"]["fields"])


def _train(tmp_path, name, cache, storage_options=None, **kw):
    return train(TrainConfig(mode="copy", out=str(tmp_path / name), cache=cache, epochs=1, batch_size=2, workers=0,
                             progress=False, log_every=1, lr=1e-3, warmup_epochs=0.5, val_cache=cache,
                             val_data=kw.get("data"), storage_options=storage_options or {}, **kw))


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def test_training_from_https_equals_training_from_the_local_copy(tmp_path, served):
    local, url = served["wds"]  # embeds its images: nothing but the URL is needed
    a = _train(tmp_path, "local", str(local))
    b = _train(tmp_path, "https", url, FAST)
    assert a["steps"] == b["steps"] > 0 and a["val_top1"] == b["val_top1"]
    wa, wb = _weights(tmp_path / "local"), _weights(tmp_path / "https")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_a_server_without_range_requests_is_named(tmp_path, request, fmt):
    shutil.copytree(request.getfixturevalue(f"folder_fp16_{fmt}"), tmp_path / "c")
    server = static_server(tmp_path, ranges=False)
    try:
        cache = open_cache(f"{server.url}/c", FAST)  # the manifest and metadata are read whole: fine
        with pytest.raises(AttncacheError, match="the server does not support HTTP range requests") as info:
            cache.read_rows([len(cache) - 1])
        assert "\n" not in str(info.value) and "checksum" not in str(info.value)
        # and the cure it names works: a copy reads every file whole
        copy_cache(f"{server.url}/c", str(tmp_path / "copied"), FAST)
        verify_cache(str(tmp_path / "copied"))
    finally:
        server.close()


def test_copy_and_verify_work_from_the_manifest_alone(tmp_path, monkeypatch):
    """Copy and verify move and hash the files a manifest names, side files like any other, and build no codec:
    with none registered (as for a codec this attncache does not know) reading the cache is refused, while copy
    and verify work and still name a damaged side file. tests/data/inputs_klt_int32 carries both side files."""
    from attncache.codecs import base

    src = Path(shutil.copytree(Path(__file__).parent / "data" / "inputs_klt_int32" / "zarr", tmp_path / "src"))
    side_files = ("teacher_qk.safetensors", "inputs_basis.safetensors")
    assert set(side_files) <= set(json.loads((src / "manifest.json").read_text())["files"])
    for name in list(base.CODECS):
        monkeypatch.delitem(base.CODECS, name)
    with pytest.raises(CacheFormatError, match="unknown codec 'inputs_klt'"):
        open_cache(str(src))  # reading the records needs the codec
    with pytest.raises(CacheFormatError, match="unknown codec 'inputs_klt'"):
        verify_cache(str(src))  # and so does the full check's decoding, which comes after every file is hashed
    files = verify_cache(str(src), decode=False)["files"]
    assert verify_cache(str(src), quick=True)["files"] == files
    result = copy_cache(str(src), str(tmp_path / "dst"))
    assert result["copied"] == files and result["files"] == files + 1  # and the manifest
    assert all((tmp_path / "dst" / name).read_bytes() == (src / name).read_bytes() for name in side_files)

    damaged = bytearray((src / "inputs_basis.safetensors").read_bytes())
    damaged[-7] ^= 0x01
    (src / "inputs_basis.safetensors").write_bytes(bytes(damaged))
    with pytest.raises(CacheFormatError, match="inputs_basis.safetensors: size/sha256 mismatch"):
        verify_cache(str(src), decode=False)
    with pytest.raises(CacheFormatError, match="inputs_basis.safetensors: does not match the size and sha256"):
        copy_cache(str(src), str(tmp_path / "dst2"))
    monkeypatch.undo()
    assert verify_cache(str(tmp_path / "dst"))["files"] == files  # the copy is the cache: it decodes


def test_a_refused_connection_is_named_as_such():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    with pytest.raises(AttncacheError) as info:
        open_cache(f"http://127.0.0.1:{port}/c", {"retries": 1, "backoff": 0.01})
    message = str(info.value)
    assert "cannot connect" in message and "after 2 attempts" in message and "manifest.json" in message
    assert "\n" not in message and "missing" not in message


# ---------------------------------------------------------------------------------------------------------------
# a network that fails now and then, or for good


def _epoch_rows(url: str, options: dict, workers: int) -> list[int]:
    cache = open_cache(url, options)
    stream = ViewStream(render_spec=RenderSpec.of(cache.teacher), batch_size=2, shuffle=True, seed=3, cache=cache,
                        drop_last=False)
    rows = []
    for batch in batches(make_loader(stream, workers)):
        rows += batch["rows"].tolist()
    return rows


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_transient_faults_are_retried_and_every_record_is_seen_once(tmp_path, served, fmt, image_folder):
    local, url = served[fmt]
    faults = Faults(every=3)  # every third request: a 503, a dropped connection or a truncated body, in turn
    proxy = fault_proxy(url.rsplit("/", 1)[0], faults)
    try:
        proxied = f"{proxy.url}/{fmt}"
        options = {**FAST, "retries": 6}
        assert torch.equal(all_rows(open_cache(proxied, options)), all_rows(open_cache(str(local))))
        if fmt == "wds":  # images embedded: a whole epoch through two loader workers sharing one --cache-dir
            cache = open_cache(str(local))
            rows = _epoch_rows(proxied, {**options, "cache_dir": str(tmp_path / "mirror")}, workers=2)
            assert sorted(rows) == list(range(cache.num_samples)) and len(rows) == len(set(rows))
        assert faults.injected >= 3
    finally:
        proxy.close()


def test_a_persistent_fault_is_one_error_naming_the_shard(served):
    local, url = served["zarr"]
    faults = Faults(persistent="/maps/c/1/")  # shard 1 of the maps always answers 503
    proxy = fault_proxy(url.rsplit("/", 1)[0], faults)
    try:
        cache = open_cache(f"{proxy.url}/zarr", FAST)
        cache.read_rows([0])  # shard 0 is fine
        with pytest.raises(AttncacheError) as info:
            cache.read_rows([6])
        message = str(info.value)
        assert "maps/c/1/0/0/0/0: cannot read after 4 attempts (HTTP 503" in message and "\n" not in message
    finally:
        proxy.close()


# ---------------------------------------------------------------------------------------------------------------
# --cache-dir: a verified, bounded read-through copy


def test_cache_dir_downloads_once_and_verifies(tmp_path, served):
    local, url = served["zarr"]
    faults = Faults()  # counts requests only
    proxy = fault_proxy(url.rsplit("/", 1)[0], faults)
    try:
        options = {**FAST, "cache_dir": str(tmp_path / "mirror")}
        expected = all_rows(open_cache(str(local)))

        def read_all():
            cache = open_cache(f"{proxy.url}/zarr", options)
            cache.check_records()
            return all_rows(cache)

        assert torch.equal(read_all(), expected)
        first = faults.count
        assert torch.equal(read_all(), expected)
        assert faults.count - first == 1  # the manifest only: every other file came from the cache dir
        mirrored = [p for p in (tmp_path / "mirror").rglob("*") if p.is_file() and not p.name.startswith(".")]
        # every file once, but the key index: only a lookup by key reads it
        assert len(mirrored) == len(open_cache(str(local)).fs.known) - 1
    finally:
        proxy.close()


def test_cache_dir_refuses_a_file_changed_on_the_server(tmp_path, folder_fp16_zarr):
    shutil.copytree(folder_fp16_zarr, tmp_path / "www" / "c")
    shard = tmp_path / "www" / "c" / "maps/c/0/0/0/0/0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    server = static_server(tmp_path / "www")
    try:
        cache = open_cache(f"{server.url}/c", {**FAST, "cache_dir": str(tmp_path / "mirror")})
        with pytest.raises(CacheFormatError, match="does not match the size and sha256 in the manifest"):
            cache.read_rows([0])
        assert not [p for p in (tmp_path / "mirror").rglob("0") if p.is_file()]  # nothing unverified kept
    finally:
        server.close()


def test_cache_dir_stays_under_its_bound(tmp_path, served):
    local, url = served["zarr"]
    shard_bytes = max(f["bytes"] for s in open_cache(str(local)).manifest["store"]["shards"] for f in s["files"])
    bound = 2 * shard_bytes + 4096
    options = {**FAST, "cache_dir": str(tmp_path / "mirror"), "cache_max_bytes": bound}
    cache = open_cache(url, options)
    assert torch.equal(all_rows(cache), all_rows(open_cache(str(local))))
    kept = sum(p.stat().st_size for p in (tmp_path / "mirror").rglob("*") if p.is_file() and p.name != ".lock")
    assert 0 < kept <= bound


# ---------------------------------------------------------------------------------------------------------------
# S3: extract to it, resume against it, train from it, copy to and from it


def test_extract_to_s3_resumes_and_trains_like_the_local_cache(tmp_path, s3, tiny_teacher, image_folder):
    url = f"s3://{s3.bucket}/caches/a"
    local = tmp_path / "local"
    extract(tiny_teacher.config(image_folder, local, views=2, records_per_shard=3))

    class Killed(Exception):
        pass

    def die_after_two(index):
        if index >= 1:
            raise Killed

    cfg = tiny_teacher.config(image_folder, url, views=2, records_per_shard=3, storage_options=s3_options(s3),
                              stage=str(tmp_path / "stage1"))
    with pytest.raises(Killed):
        extract(cfg, on_shard=die_after_two)
    remote = CacheFSFor(url, s3)
    assert not remote.exists("manifest.json") and remote.exists(".progress/plan.json")
    assert remote.exists(".progress/shard-000000.json") and remote.exists(".progress/shard-000001.json")
    remote.write_bytes("maps/c/1/0/0/0/0", b"damaged in transit")  # its marker now disagrees with it
    # another machine: an empty staging directory; the shards already on S3 are fetched, not recomputed
    written = []
    from dataclasses import replace

    manifest = extract(replace(cfg, stage=str(tmp_path / "stage2")), on_shard=written.append)
    assert 0 not in written and 1 in written and len(written) == len(manifest["store"]["shards"]) - 1
    assert not remote.exists(".progress/plan.json")
    with pytest.raises(AttncacheError, match="already holds a finished cache"):  # a finished prefix is not redone
        extract(replace(cfg, stage=str(tmp_path / "stage3")))
    here = json.loads((local / "manifest.json").read_text())
    same = [(f["path"], f["sha256"]) for s in here["store"]["shards"] for f in s["files"]]
    assert [(f["path"], f["sha256"]) for s in manifest["store"]["shards"] for f in s["files"]] == same
    verify_cache(url, s3_options(s3))
    assert torch.equal(all_rows(open_cache(url, s3_options(s3))), all_rows(open_cache(str(local))))
    a = _train(tmp_path, "run_local", str(local), data=str(image_folder))
    b = _train(tmp_path, "run_s3", url, s3_options(s3), data=str(image_folder))
    assert a["steps"] == b["steps"] > 0 and a["val_top1"] == b["val_top1"]
    assert all(torch.equal(x, y) for x, y in zip(_weights(tmp_path / "run_local").values(),
                                                   _weights(tmp_path / "run_s3").values(), strict=True))


def test_extract_to_s3_publishes_the_plan_first_each_shard_before_its_marker_and_the_manifest_last(
        tmp_path, s3, monkeypatch, tiny_teacher, image_folder):
    import attncache.extract as extract_module
    from attncache.errors import DiskFullError

    url, stage = f"s3://{s3.bucket}/caches/order", tmp_path / "stage"
    cfg = tiny_teacher.config(image_folder, url, views=2, records_per_shard=3, storage_options=s3_options(s3),
                              stage=str(stage))
    monkeypatch.setattr(extract_module, "free_bytes", lambda path: 1000)  # the staging directory is what fills
    with pytest.raises(DiskFullError, match=f"^{stage}: the cache needs about"):
        extract(cfg)
    assert not CacheFSFor(url, s3).exists(".progress/plan.json")  # refused before the claim: nothing published
    monkeypatch.undo()
    puts = []
    put = CacheFS.put
    monkeypatch.setattr(CacheFS, "put", lambda self, rel, local: (puts.append(rel), put(self, rel, local))[1])
    manifest = extract(cfg)
    assert puts[0] == ".progress/plan.json" and puts[-1] == "manifest.json" and puts.count("manifest.json") == 1
    for index, shard in enumerate(manifest["store"]["shards"]):
        marker = puts.index(f".progress/shard-{index:06d}.json")
        assert all(puts.index(f["path"]) < marker for f in shard["files"])  # a marker means its files are there
    assert set(puts) >= {f["path"] for f in named_files(manifest)}
    remote = CacheFSFor(url, s3)
    assert remote.exists("manifest.json") and not remote.exists(".progress/plan.json")


def test_a_remote_out_takes_one_extraction_process(tmp_path, monkeypatch, tiny_teacher, image_folder):
    from dataclasses import replace

    stage = tmp_path / "stage"
    cfg = tiny_teacher.config(image_folder, "s3://never-contacted/caches/a", stage=str(stage))
    with pytest.raises(AttncacheError, match="a remote `out` takes one extraction process"):
        extract(replace(cfg, num_shards=2))
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun
    with pytest.raises(AttncacheError, match="a remote `out` takes one extraction process"):
        extract(cfg)
    assert not stage.exists()


def CacheFSFor(url, s3):  # noqa: N802 - reads like a type
    from attncache.store.fs import CacheFS

    return CacheFS(url, s3_options(s3))


def test_copy_between_local_s3_and_https_is_verified_and_resumable(tmp_path, s3, served):
    local, url = served["wds"]
    bucket = f"s3://{s3.bucket}/copies/wds"
    first = copy_cache(url, bucket, FAST, s3_options(s3))  # https -> s3
    assert first["kept"] == 0 and first["copied"] == first["files"] - 1
    back = tmp_path / "back"
    copy_cache(bucket, str(back), s3_options(s3))  # s3 -> local
    for f in open_cache(str(local)).fs.known:
        assert (back / f).read_bytes() == (local / f).read_bytes()
    assert (back / "manifest.json").read_bytes() == (local / "manifest.json").read_bytes()
    # a killed copy: a missing file and a half-written one; the re-run replaces exactly those
    (back / "views.bin").unlink()
    shard = back / "shards/shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    again = copy_cache(bucket, str(back), s3_options(s3))
    assert again["copied"] == 2
    verify_cache(str(back))
    # a pinned manifest hash that is not this cache's is refused before anything is copied
    with pytest.raises(CacheFormatError, match="not the cache that was published"):
        copy_cache(url, str(tmp_path / "other"), FAST, manifest_sha256="0" * 64)
    assert not (tmp_path / "other").exists()


def test_copy_writes_the_manifest_it_pinned_even_if_the_source_changes_meanwhile(tmp_path, folder_fp16_zarr,
                                                                                 monkeypatch):
    """Regression: copy checked the pin on one read of the manifest and wrote a second read of it, so a source
    that changed in between (a re-published cache) left a copy whose manifest was not the pinned one."""
    import attncache.tools.copy as copy_module

    src = tmp_path / "src"
    shutil.copytree(folder_fp16_zarr, src)
    pinned = hashlib.sha256((src / "manifest.json").read_bytes()).hexdigest()

    def open_then_republish(*args, **kwargs):
        files = CacheFiles(*args, **kwargs)
        (src / "manifest.json").write_bytes((src / "manifest.json").read_bytes() + b"\n")
        return files

    monkeypatch.setattr(copy_module, "CacheFiles", open_then_republish)
    copy_cache(str(src), str(tmp_path / "dst"), manifest_sha256=pinned)
    assert hashlib.sha256((tmp_path / "dst" / "manifest.json").read_bytes()).hexdigest() == pinned
    verify_cache(str(tmp_path / "dst"))


def test_copy_streams_each_file_through_a_network_that_drops(tmp_path, served, monkeypatch):
    """Each file is streamed in blocks (never read whole: the views table is 1.3 GB at ImageNet scale) and a
    response cut short is retried; the copy is byte for byte the cache."""
    import attncache.tools.copy as copy_module

    monkeypatch.setattr(copy_module, "BLOCK", 4096)
    reads = []
    real_read = CacheFS.read
    monkeypatch.setattr(CacheFS, "read", lambda self, rel, limit: reads.append(rel) or real_read(self, rel, limit))
    local, url = served["zarr"]
    faults = Faults(every=4, kinds=("truncate", "503", "drop"))
    proxy = fault_proxy(url.rsplit("/", 1)[0], faults)
    try:
        copy_cache(f"{proxy.url}/zarr", str(tmp_path / "copy"), FAST)
    finally:
        proxy.close()
    assert faults.injected > 0
    assert reads and all(r.endswith(".json") for r in reads), reads  # only metadata is read whole, by the open
    for f in open_cache(str(local)).fs.known:
        assert (tmp_path / "copy" / f).read_bytes() == (local / f).read_bytes(), f
    verify_cache(str(tmp_path / "copy"))


def test_copy_refuses_a_damaged_source_and_writes_no_manifest(tmp_path, folder_fp16_zarr):
    src = tmp_path / "src"
    shutil.copytree(folder_fp16_zarr, src)
    shard = src / "maps/c/1/0/0/0/0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheFormatError, match="maps/c/1/0/0/0/0: does not match the size and sha256"):
        copy_cache(str(src), str(tmp_path / "dst"))
    assert not (tmp_path / "dst" / "manifest.json").exists()
    assert not (tmp_path / "dst" / "maps/c/1/0/0/0/0").exists()


def test_copy_to_https_is_refused(served, tmp_path):
    local, url = served["zarr"]
    with pytest.raises(AttncacheError, match="read-only"):
        copy_cache(str(local), url)


# ---------------------------------------------------------------------------------------------------------------
# the command line


def test_cli_inspect_verify_and_copy_over_http(tmp_path, served):
    from attncache_cli.main import app
    from typer.testing import CliRunner

    local, url = served["zarr"]
    digest = hashlib.sha256((local / "manifest.json").read_bytes()).hexdigest()
    runner = CliRunner()
    r = runner.invoke(app, ["inspect", url, "--json", "--storage-option", "retries=2"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["manifest_sha256"] == digest
    r = runner.invoke(app, ["verify", url, "--quick", "--manifest-sha256", digest])
    assert r.exit_code == 0 and r.stdout.startswith("ok (quick):") and digest in r.stdout
    r = runner.invoke(app, ["copy", url, str(tmp_path / "c"), "--quiet", "--manifest-sha256", digest])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["verify", str(tmp_path / "c"), "--cache-dir", str(tmp_path / "unused")])
    assert r.exit_code == 0 and r.stdout.startswith("ok (full):")
    r = runner.invoke(app, ["verify", url, "--manifest-sha256", "f" * 64])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "not the cache that was published" in r.stderr


def test_a_missing_backend_is_one_line_naming_the_extra(monkeypatch):
    import fsspec

    def no_s3fs(url, **kw):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec.core, "url_to_fs", no_s3fs)
    with pytest.raises(AttncacheError, match=r"s3:// needs a package that is not installed \(pip install "
                                             r"'attncache\[s3\]'"):
        open_cache("s3://bucket/cache")


def test_loader_workers_reopen_exactly_the_manifest_this_process_read(tmp_path, folder_fp16_zarr):
    """A pickled cache (what a DataLoader worker gets) carries the manifest bytes this process read and validated:
    a worker fetches no manifest (at 72 workers a node that would be 72 downloads) and cannot see another cache's
    manifest; a changed manifest in the folder meanwhile is not what the worker uses."""
    import pickle

    root = tmp_path / "c"
    shutil.copytree(folder_fp16_zarr, root)
    cache = open_cache(str(root))
    blob = pickle.dumps(cache)
    original = (root / "manifest.json").read_bytes()
    (root / "manifest.json").unlink()  # nothing to read: the worker opens from the bytes it was given
    worker = pickle.loads(blob)
    assert torch.equal(worker.read_rows([0]), cache.read_rows([0]))
    assert worker.manifest_sha256 == hashlib.sha256(original).hexdigest() == cache.manifest_sha256
    assert worker.view_json(3) == cache.view_json(3)

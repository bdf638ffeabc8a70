"""Format version 5's record tables: round trips, every damaged byte caught on the read path, hostile rows and
lying manifest entries refused with one line, key lookups, the JSONL caches of version 4 read the same, and a
remote cache's tables fetched once per node, not once per loader worker."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import as_version_4
from servers import Faults, S3Server, fault_proxy, static_server

from attncache import open_cache
from attncache.errors import AttncacheError, CacheFormatError
from attncache.store import records
from attncache.store.format import seal
from attncache.store.fs import CacheFS
from attncache.store.records import KEYS_TABLE, SAMPLES_TABLE, TABLES, VIEWS_TABLE, Layout
from attncache.store.tables import MemoryTable, TableReader, table_bytes, write_table
from attncache.tools.verify import verify_cache

ROW = np.dtype([("a", "<u4"), ("b", "<f8", (2,))])


def _rows(n: int) -> np.ndarray:
    rows = np.zeros(n, ROW)
    rows["a"] = np.arange(n) * 7 + 3
    rows["b"] = np.arange(2 * n).reshape(n, 2) / 3
    return rows


@pytest.mark.parametrize("n,per_block", [(1, 4), (10, 4), (12, 4), (100, 7)])
def test_table_round_trip_by_row_take_and_slice(tmp_path, n, per_block):
    rows = _rows(n)
    entry = write_table(tmp_path / "t.bin", rows, per_block)
    assert entry["bytes"] == (tmp_path / "t.bin").stat().st_size == table_bytes(n, per_block, ROW.itemsize)
    assert entry["sha256"] == hashlib.sha256((tmp_path / "t.bin").read_bytes()).hexdigest()
    reader = TableReader(CacheFS(tmp_path), "t.bin", ROW, n, per_block, cache_blocks=2)
    assert reader.slice(0, n).tobytes() == rows.tobytes()
    order = np.random.default_rng(0).integers(0, n, 3 * n)
    assert reader.take(order).tobytes() == rows[order].tobytes()
    assert all(reader.row(i).tobytes() == rows[i].tobytes() for i in range(n))
    with pytest.raises(IndexError, match="row"):
        reader.row(n)


def test_every_flipped_byte_of_a_table_is_an_error_naming_the_file_and_block(tmp_path):
    n, per_block = 9, 4
    write_table(tmp_path / "t.bin", _rows(n), per_block)
    clean = (tmp_path / "t.bin").read_bytes()
    for at in range(len(clean)):
        damaged = bytearray(clean)
        damaged[at] ^= 1 << (at % 8)
        (tmp_path / "t.bin").write_bytes(bytes(damaged))
        reader = TableReader(CacheFS(tmp_path), "t.bin", ROW, n, per_block)
        with pytest.raises(CacheFormatError, match=r"t\.bin: checksum mismatch in block \d"):
            reader.slice(0, n)
    stride = per_block * ROW.itemsize + 4  # two whole blocks swapped, each with its own (valid) checksum
    (tmp_path / "t.bin").write_bytes(clean[stride:2 * stride] + clean[:stride] + clean[2 * stride:])
    with pytest.raises(CacheFormatError, match=r"checksum mismatch in block 0"):
        TableReader(CacheFS(tmp_path), "t.bin", ROW, n, per_block).row(0)
    (tmp_path / "t.bin").write_bytes(clean[:-3])
    with pytest.raises(CacheFormatError, match=r"t\.bin: truncated \(block 2"):
        TableReader(CacheFS(tmp_path), "t.bin", ROW, n, per_block).row(8)


# ---------------------------------------------------------------------------------------------------------------
# a real cache's tables


@pytest.fixture
def recipe_copy(tmp_path, recipe_wds) -> Path:
    """A copy of the distill-recipe cache: RandAugment, erasing, mixup/cutmix partners, drop-path masks."""
    root = tmp_path / "c"
    shutil.copytree(recipe_wds, root)
    return root


def test_views_and_samples_read_from_tables_equal_the_views_the_policy_drew(recipe_copy):
    from attncache.views import ViewPolicy

    cache = open_cache(str(recipe_copy))
    assert cache.manifest["version"] == 5 and not (recipe_copy / "views.jsonl").exists()
    samples = [cache.sample_at(i) for i in range(cache.num_samples)]
    policy, t = ViewPolicy.from_json(cache.manifest["views"]), cache.teacher
    drawn = policy.views(samples, t.image_size, mean=t.mean, interpolation=t.interpolation, depth=t.depth)
    assert [cache.view(r) for r in range(len(cache))] == drawn
    mixed = [r for r in range(len(cache)) if drawn[r].mix is not None]
    assert mixed and all(cache.view(r).mix.partner_index == drawn[r].mix.partner_index for r in mixed)
    assert all(cache.view(r).drop_path is not None and cache.view(r).augment for r in range(len(cache)))
    assert all(cache.row(s["key"], 1) == cache.num_samples + i for i, s in enumerate(samples))


def test_a_version_4_cache_reads_the_same_samples_and_views(recipe_copy, tmp_path):
    v5 = open_cache(str(recipe_copy))
    legacy = tmp_path / "v4"
    shutil.copytree(recipe_copy, legacy)
    as_version_4(legacy)
    v4 = open_cache(str(legacy))
    assert v4.manifest["version"] == 4 and (legacy / "views.jsonl").exists()
    assert [v4.view_json(r) for r in range(len(v4))] == [v5.view_json(r) for r in range(len(v5))]
    assert v4.row(v5.sample_at(3)["key"]) == 3


def test_a_flipped_byte_in_any_table_is_an_error_on_the_read_path(recipe_copy):
    """Every file: a byte flipped anywhere is caught by the first read that touches it (here: reading every
    record's view and sample) and by verify; never a different view."""
    rng = np.random.default_rng(1)
    for name in TABLES:
        path = recipe_copy / name
        clean = path.read_bytes()
        for at in rng.choice(len(clean), 6, replace=False):
            damaged = bytearray(clean)
            damaged[at] ^= 0x10
            path.write_bytes(bytes(damaged))
            cache = open_cache(str(recipe_copy))
            with pytest.raises(CacheFormatError, match=rf"{name}: checksum mismatch"):
                cache.check_records()
                cache.row("no such key")  # the key index is read by lookups
            with pytest.raises(CacheFormatError, match=name):
                verify_cache(str(recipe_copy), decode=False)
        path.write_bytes(clean)


def _rewrite_table(root: Path, name: str, edit) -> None:
    """Edit a table's rows and re-seal the cache as an attacker would: checksums and sha256 all consistent."""
    m = json.loads((root / "manifest.json").read_text())
    entry = m["files"][name]
    dtype = records.table_dtypes(m)[name]
    t = entry["table"]
    reader = TableReader(CacheFS(root), name, dtype, t["rows"], t["rows_per_block"])
    rows = reader.slice(0, t["rows"]).copy()
    rows = edit(rows)
    new = write_table(root / name, rows, t["rows_per_block"])
    m["files"][name] = new
    (root / "manifest.json").write_text(json.dumps(seal(m)))


def _first_mixed(root: Path) -> int:
    cache = open_cache(str(root))
    return next(r for r in range(len(cache)) if cache.view(r).mix is not None)


HOSTILE_ROWS = {
    "op code": (VIEWS_TABLE, lambda r, i: r["view"]["augment_op"].__setitem__((i, 0), 200), "augment op code 200"),
    "op count": (VIEWS_TABLE, lambda r, i: r["view"]["augments"].__setitem__(i, 9), "9 augment ops"),
    "flags": (VIEWS_TABLE, lambda r, i: r["view"]["flags"].__setitem__(i, 0x80), "view flags 128"),
    "box outside": (VIEWS_TABLE, lambda r, i: r["view"]["box"].__setitem__((i, 2), 1e9), "outside the"),
    "nan box": (VIEWS_TABLE, lambda r, i: r["view"]["box"].__setitem__((i, 0), np.nan), "invalid view box"),
    "partner out of range": (VIEWS_TABLE, lambda r, i: r["partner"].__setitem__(i, 10**12), "mix partner"),
    "mix code": (VIEWS_TABLE, lambda r, i: r["mix"].__setitem__(i, 7), "mix code 7"),
    "lam": (VIEWS_TABLE, lambda r, i: r["lam"].__setitem__(i, 3.0), "mix lam"),
    "label": (SAMPLES_TABLE, lambda r, i: r["label"].__setitem__(0, 10**6), "label"),
    "key outside heap": (SAMPLES_TABLE, lambda r, i: r["key_offset"].__setitem__(0, 2**40), "key heap"),
    "empty key": (SAMPLES_TABLE, lambda r, i: r["key_bytes"].__setitem__(0, 0), "key heap"),
    "not utf-8": (KEYS_TABLE, lambda r, i: r.__setitem__(0, 0xFF), "not UTF-8"),
}


@pytest.mark.parametrize("what", sorted(HOSTILE_ROWS))
def test_hostile_rows_with_valid_checksums_are_refused_in_one_line(recipe_copy, what):
    name, edit, match = HOSTILE_ROWS[what]
    row = _first_mixed(recipe_copy)
    _rewrite_table(recipe_copy, name, lambda rows: (edit(rows, row), rows)[1])
    cache = open_cache(str(recipe_copy))
    with pytest.raises(CacheFormatError, match=match) as info:
        cache.view(row) if name == VIEWS_TABLE else cache.sample_at(0)
    message = str(info.value)
    assert "\n" not in message and name in message and "row" in message


LYING_ENTRIES = {
    "rows": (VIEWS_TABLE, {"rows": 3}, "table.rows must be"),
    "row_bytes": (VIEWS_TABLE, {"row_bytes": 8}, "row_bytes must be"),
    "huge blocks": (SAMPLES_TABLE, {"rows_per_block": 1 << 20}, "blocks of more than"),
    "heap": (KEYS_TABLE, {"rows": 1}, "a key has"),
}


@pytest.mark.parametrize("what", sorted(LYING_ENTRIES))
def test_lying_table_entries_in_the_manifest_are_refused_at_open(recipe_copy, what):
    name, change, match = LYING_ENTRIES[what]
    m = json.loads((recipe_copy / "manifest.json").read_text())
    m["files"][name]["table"].update(change)
    (recipe_copy / "manifest.json").write_text(json.dumps(seal(m)))
    with pytest.raises(CacheFormatError, match=match):
        open_cache(str(recipe_copy))
    m["files"][name]["table"] = None
    (recipe_copy / "manifest.json").write_text(json.dumps(seal(m)))
    with pytest.raises(CacheFormatError, match="manifest"):
        open_cache(str(recipe_copy))


def test_key_lookup_with_colliding_hashes(monkeypatch, recipe_copy):
    """Every key hashing to the same value: the lookup compares keys along the run of equal hashes."""
    cache = open_cache(str(recipe_copy))
    keys = [cache.sample_at(i)["key"] for i in range(cache.num_samples)]
    monkeypatch.setattr(records, "key_hash", lambda key: 42)
    index = MemoryTable(records.key_index_rows(keys))
    tables = cache.records
    tables.key_index = index
    assert [tables.index_of(k) for k in keys] == list(range(len(keys)))
    assert tables.index_of("absent") is None


def test_layout_follows_the_policy(recipe_copy):
    m = json.loads((recipe_copy / "manifest.json").read_text())
    layout = Layout.of(m)
    assert layout.augment_slots == 2 and layout.erase_slots == 1 and layout.mixes
    assert layout.depth_bytes == (m["teacher"]["depth"] + 7) // 8


def test_inspect_views_prints_rows_as_json(recipe_copy):
    from attncache_cli.main import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["inspect", str(recipe_copy), "--views", "0,2:4"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in result.stdout.splitlines()]
    assert [x["row"] for x in lines] == [0, 2, 3]
    cache = open_cache(str(recipe_copy))
    assert lines[1]["image"] == cache.sample_at(2) and lines[1]["box"] == list(cache.view(2).box)
    bad = CliRunner().invoke(app, ["inspect", str(recipe_copy), "--views", "99999"])
    assert bad.exit_code == 2 and "row 99999" in bad.output


# ---------------------------------------------------------------------------------------------------------------
# remote: each table fetched once per node


def test_remote_training_with_four_workers_fetches_each_table_once(tmp_path, recipe_wds, tiny_teacher):
    from attncache.train import TrainConfig, train

    www = tmp_path / "www"
    shutil.copytree(recipe_wds, www / "c")
    server = static_server(www)
    faults = Faults()
    proxy = fault_proxy(server.url, faults)
    try:
        url = f"{proxy.url}/c"
        options = {"retries": 2, "backoff": 0.01, "cache_dir": str(tmp_path / "mirror")}
        train(TrainConfig(mode="distill", out=str(tmp_path / "run"), cache=url, epochs=1, batch_size=4, workers=4,
                          progress=False, log_every=1, lr=1e-3, warmup_epochs=0.5, storage_options=options,
                          drop_path=0.2))
    finally:
        proxy.close()
        server.close()
    fetched = {name: sum(p.endswith(f"/c/{name}") for p in faults.paths) for name in TABLES}
    # once each; the key index only by a lookup by key, which training from a cache of embedded images never does
    assert fetched == {**{name: 1 for name in TABLES}, "key_index.bin": 0}, fetched
    assert sum(p.endswith("/c/manifest.json") for p in faults.paths) == 1  # the workers get the bytes, not a URL


def test_s3_training_with_four_workers_fetches_each_table_once(tmp_path, recipe_wds):
    """The same over S3 (moto's server behind the counting proxy, path-style requests): each table one GET."""
    import s3fs

    from attncache.train import TrainConfig, train

    s3 = S3Server(bucket="fetch-once")
    faults = Faults()
    proxy = fault_proxy(s3.endpoint, faults)
    try:
        s3fs.S3FileSystem(**s3.options, skip_instance_cache=True).put(str(recipe_wds), f"{s3.bucket}/c",
                                                                         recursive=True)
        options = {"key": "testing", "secret": "testing", "endpoint_url": proxy.url, "retries": 2, "backoff": 0.01,
                   "cache_dir": str(tmp_path / "mirror")}
        train(TrainConfig(mode="distill", out=str(tmp_path / "run"), cache=f"s3://{s3.bucket}/c", epochs=1,
                          batch_size=4, workers=4, progress=False, log_every=1, lr=1e-3, warmup_epochs=0.5,
                          storage_options=options, drop_path=0.2))
    finally:
        proxy.close()
        s3.close()
    paths = [p.split("?")[0] for p in faults.paths]
    fetched = {name: sum(p.endswith(f"/c/{name}") for p in paths) for name in TABLES}
    requests = list(zip(faults.methods, paths, strict=True))
    assert fetched == {**{name: 1 for name in TABLES}, "key_index.bin": 0}, (fetched, requests)
    # every request of a table counted (no HEAD first); the manifest read once (its size is unknown: one HEAD)
    assert [m for m, p in requests if p.endswith("/c/manifest.json")] == ["HEAD", "GET"]
    assert any(p.endswith(".tar") for p in paths)  # the maps came through the proxy too


def test_an_unknown_row_selection_is_one_line(recipe_copy):
    with pytest.raises(AttncacheError, match="expected N, START:STOP"):
        open_cache(str(recipe_copy)).parse_rows("a-b")


# ---------------------------------------------------------------------------------------------------------------
# the manifest at ImageNet scale: 20,000 shards


def _scaled_manifest(path: Path, shards: int) -> dict:
    """A real cache's manifest grown to `shards` shards (and records, and tables) as extraction would write it."""
    from attncache.store.format import shard_paths

    m = json.loads(path.read_text())
    per, k = m["store"]["records_per_shard"], m["views"]["views_per_image"]
    n = shards * per // k
    m["dataset"]["num_samples"], m["store"]["records"] = n, n * k
    for name, rows in records.table_entry_rows(m).items():
        t = m["files"][name]["table"]
        t["rows"] = rows if rows is not None else 5 * n
        m["files"][name]["bytes"] = table_bytes(t["rows"], t["rows_per_block"], t["row_bytes"])
    m["store"]["shards"] = [{"index": i, "first_record": i * per, "records": min(per, n * k - i * per),
                             "files": [{"path": p, "bytes": 1 << 30, "sha256": "ab" * 32}
                                       for p in shard_paths("zarr", m["codec"]["fields"], i)]}
                            for i in range(-(-n * k // per))]
    return seal(m)


def test_a_manifest_of_20000_shards_fits_and_every_shard_entry_is_checked(folder_fp16_zarr):
    from attncache.store.format import MAX_MANIFEST_BYTES, parse_manifest

    m = _scaled_manifest(folder_fp16_zarr / "manifest.json", 20_000)
    data = json.dumps(m, indent=2).encode()
    assert len(m["store"]["shards"]) == 20_000 and len(data) < MAX_MANIFEST_BYTES // 8
    assert parse_manifest(data)["store"]["records"] == m["store"]["records"]
    for bad in ({"bytes": "1"}, {"bytes": -1}, {"sha256": "AB" * 32}, {"extra": 1}, {"bytes": True}):
        broken = json.loads(data)
        broken["store"]["shards"][12_345]["files"][0].update(bad)
        with pytest.raises(CacheFormatError, match=r"store\.shards\.12345"):
            parse_manifest(json.dumps(seal(broken)).encode())


def test_a_committed_version_4_recipe_cache_reads_its_json_views():
    """tests/data/recipe_v4: an at-distill cache as attncache 0.3.0 wrote it (format version 4: views.jsonl with
    RandAugment, erasing, mixup/cutmix partners by key and drop-path masks). Its views read as its JSON says, and
    mixing partners get the index of their key."""
    from attncache.views import View

    root = Path(__file__).parent / "data" / "recipe_v4" / "zarr"
    cache = open_cache(str(root))
    assert cache.manifest["version"] == 4 and len(cache) == 8
    samples = [json.loads(x) for x in (root / "samples.jsonl").read_text().splitlines()]
    lines = [json.loads(x) for x in (root / "views.jsonl").read_text().splitlines()]
    keys = [s["key"] for s in samples]
    for row, line in enumerate(lines):
        view = cache.view(row)
        assert view == View.from_json({k: v for k, v in line.items() if k not in ("sample", "view")})
        assert cache.sample(row) == samples[line["sample"]]
        if view.mix is not None:
            assert view.mix.partner_index == keys.index(line["mix"]["partner"])
    assert any(cache.view(r).mix is not None for r in range(8)) and cache.view(0).drop_path is not None
    # this version's drawing (one view at a time) gives the views 0.3.0 drew (all of an image's at once)
    from attncache.views import ViewPolicy

    t = cache.teacher
    drawn = ViewPolicy.from_json(cache.manifest["views"]).views(samples, t.image_size, mean=t.mean,
                                                                 interpolation=t.interpolation, depth=t.depth)
    assert drawn == [cache.view(r) for r in range(8)]
    assert cache.row(keys[2], 1) == 2 + len(keys)
    assert cache.read_rows([0, 7]).shape[0] == 2


def test_a_pool_of_processes_draws_the_same_views_table(monkeypatch):
    """Issue 22 (extraction at scale): rank 0 drew every view on one core before any shard was written (~0.3 ms per
    `at-distill` view: ~27 min for ImageNet's 5.12M). A large cache's views are drawn by a pool of processes, a
    span each: the rows are the same bytes, in the same order, as one process draws."""
    from attncache.extract import DrawnViews
    from attncache.extract import views as drawing
    from attncache.recipes import RECIPES
    from attncache.store.records import Layout
    from attncache.views import ViewPolicy

    monkeypatch.setattr(drawing, "SPAN", 256)  # several spans, in flight at once
    policy = ViewPolicy(views_per_image=4, seed=3, augment=RECIPES["at-distill"].augment)
    samples = [{"key": f"k{i}", "label": i % 10, "sha256": f"{i:064x}", "width": 40 + i % 7, "height": 30 + i % 5}
               for i in range(300)]
    spec = SimpleNamespace(image_size=16, mean=(0.5, 0.5, 0.5), interpolation="bicubic", depth=24)  # what is drawn
    drawn = DrawnViews(policy, samples, spec)
    layout = Layout.of({"views": policy.to_json(), "teacher": {"depth": 24}})
    one = np.concatenate(list(drawn.table_rows(layout, processes=1)))
    pooled = list(drawn.table_rows(layout, processes=2, pool_min=0))
    assert len(pooled) == 5 and len(one) == 1200  # 1,200 records in spans of 256
    assert np.concatenate(pooled).tobytes() == one.tobytes()
    assert one.tobytes() == drawing.record_rows(list(drawn), layout).tobytes()  # = the views, drawn one by one

"""The training reader: one batch sequence per epoch, dealt to workers so that neither the worker count nor a
resume point changes it; rank splits; decoded maps in batch order."""

from __future__ import annotations

import pytest
import torch

from attncache import open_cache
from attncache.errors import AttncacheError
from attncache.sources import open_source
from attncache.train.loader import RenderSpec, ViewStream, batches, make_loader


def stream(cache_dir, data=None, **kw) -> ViewStream:
    cache = open_cache(str(cache_dir))
    base = dict(render_spec=RenderSpec.of(cache.teacher), batch_size=2, shuffle=True, seed=0, cache=cache,
                source=open_source(str(data)) if data else None)
    return ViewStream(**{**base, **kw})


def rows_of(plan) -> list[int]:
    return [r for b in plan for r in b]


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_epochs_are_shuffles_of_one_view(request, fmt):
    s = stream(request.getfixturevalue(f"folder_fp16_{fmt}"), drop_last=False)
    seen = []
    for epoch in range(4):
        rows = rows_of(s.plan(epoch))
        view = epoch % 2
        assert sorted(rows) == list(range(view * 6, view * 6 + 6))  # every image once, view e mod K
        seen.append(rows)
    assert seen[0] == rows_of(s.plan(0))  # a pure function of (seed, epoch)
    assert seen[0] != seen[2]  # and a new order every epoch
    other_seed = stream(request.getfixturevalue(f"folder_fp16_{fmt}"), seed=1, drop_last=False)
    assert rows_of(other_seed.plan(0)) != seen[0]


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_every_epoch_has_the_same_number_of_batches(request, fmt):
    """drop_last: floor(images / batch) batches in every epoch, whatever the shard layout or shuffle."""
    for batch_size in (1, 2, 4, 5):
        s = stream(request.getfixturevalue(f"folder_fp16_{fmt}"), batch_size=batch_size)
        counts = {len(s.plan(epoch)) for epoch in range(8)}
        assert counts == {6 // batch_size} and s.batches_per_epoch() == 6 // batch_size
        assert all(len(b) == batch_size for e in range(8) for b in s.plan(e))


def test_rank_split_is_disjoint_and_even(folder_fp32_zarr, folder_fp16_wds):
    for cache in (folder_fp32_zarr, folder_fp16_wds):
        plans = [stream(cache, rank=r, world_size=4, batch_size=1).plan(0) for r in range(4)]
        rows = rows_of([b for p in plans for b in p])
        assert len(rows) == len(set(rows)) == 4  # 6 images over 4 ranks: 1 each, the remainder dropped evenly
        assert {len(p) for p in plans} == {1}
    # more ranks than shards is fine: every rank reads by record, from any shard
    wds = [stream(folder_fp16_wds, rank=r, world_size=6, batch_size=1).plan(0) for r in range(6)]
    assert sorted(rows_of([b for p in wds for b in p])) == list(range(6))


def test_webdataset_order_keeps_batches_within_few_shards(folder_fp16_wds):
    s = stream(folder_fp16_wds, batch_size=2, shuffle_buffer=2)
    per_shard = s.cache.manifest["store"]["records_per_shard"]
    for epoch in range(4):
        for b in s.plan(epoch):
            assert len({r // per_shard for r in b}) <= 2


def _through_loader(s: ViewStream, workers: int, epoch: int, start: int = 0) -> list[tuple[int, list[int]]]:
    loader = make_loader(s, workers)
    s.set_position(epoch, start)
    out = [(b["index"], b["rows"].tolist()) for b in batches(loader)]
    del loader
    return out


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_workers_yield_the_one_sequence_and_resume_anywhere(request, fmt, image_folder):
    """DataLoader workers deal the epoch's batches round robin: the sequence the trainer sees is the plan, every
    row once, for 0, 2 or 3 workers, from the start or from any batch (the resume point of a checkpoint)."""
    cache = request.getfixturevalue(f"folder_fp16_{fmt}")
    s = stream(cache, image_folder, batch_size=1)
    plan = s.plan(1)
    expected = list(enumerate(plan))
    assert sorted(rows_of(plan)) == list(range(6, 12))
    for workers in (0, 2, 3):
        assert _through_loader(s, workers, 1) == expected
    for start in (1, 2, 5):  # the per-worker progress at a resume point does not matter
        assert _through_loader(s, 3, 1, start) == expected[start:]
        assert _through_loader(s, 0, 1, start) == expected[start:]


def test_batches_carry_the_cached_fields_in_batch_order(folder_fp32_zarr, image_folder):
    s = stream(folder_fp32_zarr, image_folder, batch_size=3)
    cache = open_cache(str(folder_fp32_zarr))
    loaded = list(s)
    assert [b["index"] for b in loaded] == [0, 1]
    for b in loaded:
        rows = b["rows"].tolist()
        torch.testing.assert_close(cache.codec.decode(b["fields"]), cache.read_rows(rows), rtol=0, atol=0)
        assert b["labels"].tolist() == [cache.sample_at(r % 6)["label"] for r in rows]
        assert b["images"].shape == (3, 3, 32, 32)
    unsorted = next(b.tolist() for e in range(10) for b in s.plan(e) if b.tolist() != sorted(b.tolist()))
    fields = s.load(0, unsorted)["fields"]  # read in storage order, handed back in batch order
    torch.testing.assert_close(cache.codec.decode(fields), cache.read_rows(unsorted), rtol=0, atol=0)


def test_cached_keys_are_checked_against_the_source_as_hash_arrays(tmp_path, folder_fp16_zarr, monkeypatch):
    """Issue 22: before the first step, every cached key was looked up in the source one at a time (~10 s for
    ImageNet's 1.28M keys in every training process). The cache's key index and the source's sorted key hashes
    are compared as arrays: no per-key lookup runs (made to fail here), and a missing image is still named, the
    first in sample order."""
    from conftest import make_image_folder

    from attncache.sources import FolderSource, Source
    from attncache.train.loader import check_images

    def no_lookups(self, *args):
        raise AssertionError("a per-key lookup ran")

    cache = open_cache(str(folder_fp16_zarr))
    whole = make_image_folder(tmp_path / "whole")
    monkeypatch.setattr(Source, "missing_keys", no_lookups)
    monkeypatch.setattr(Source, "_key_index", no_lookups)
    check_images(cache, FolderSource(whole), "cache", "data")  # every key there: passes
    broken = make_image_folder(tmp_path / "broken")
    for name in ("cat/c1.png", "bee/b1.png"):
        (broken / name).unlink()
    with pytest.raises(AttncacheError, match=r"`data` .*: 2 cached image\(s\) not found, e.g. 'bee/b1.png'"):
        check_images(cache, FolderSource(broken), "cache", "data")


def test_workers_take_the_epoch_plan_the_training_process_drew(folder_fp16_zarr, image_folder, monkeypatch):
    """Issue 22: every loader worker drew the whole epoch's order itself (O(records) work and memory per worker: an
    ImageNet epoch is 1.28M rows, 8 workers per rank). The training process draws it once, in set_position,
    into memory the workers share: an order patched into the training process only is what the workers deal."""
    s = stream(folder_fp16_zarr, image_folder, batch_size=1)
    reversed_order = lambda self, epoch: self.epoch_items(epoch)[::-1]  # noqa: E731
    monkeypatch.setattr(ViewStream, "order", reversed_order)  # the workers (forkserver) run the real one
    got = _through_loader(s, 2, 1)
    assert got == [(i, [11 - i]) for i in range(6)]

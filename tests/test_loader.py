"""The training reader: epoch order, rank/worker splits, shuffles, decoded maps in batch order, resume skips."""

from __future__ import annotations

import pytest
import torch

from attncache import open_cache
from attncache.errors import AttncacheError
from attncache.loader import RenderSpec, ViewStream


def stream(cache_dir, data=None, **kw) -> ViewStream:
    from attncache.data import open_source

    cache = open_cache(str(cache_dir))
    base = dict(render_spec=RenderSpec.of(cache.teacher), batch_size=2, shuffle=True, seed=0,
                cache_root=str(cache_dir), source=open_source(str(data)) if data else None)
    return ViewStream(**{**base, **kw})


def test_zarr_epochs_are_global_shuffles_of_one_view(folder_fp32_zarr):
    s = stream(folder_fp32_zarr, drop_last=False)
    seen = []
    for epoch in range(4):
        rows = [r for b in s.plan(epoch) for r in b]
        view = epoch % 2
        assert sorted(rows) == list(range(view * 6, view * 6 + 6))  # every image once, view e mod K
        seen.append(rows)
    assert seen[0] != [r for b in stream(folder_fp32_zarr, seed=1, drop_last=False).plan(0) for r in b]
    assert seen[0] == [r for b in s.plan(0) for r in b]  # a pure function of (seed, epoch)
    # workers take the global batch list round-robin: the DataLoader's yield order is the one-process order
    for workers in (2, 3):
        per_worker = [s.plan(1, w, workers) for w in range(workers)]
        interleaved = [per_worker[j % workers][j // workers] for j in range(len(s.plan(1)))]
        assert interleaved == s.plan(1)


def test_rank_split_is_disjoint_and_even(folder_fp32_zarr):
    plans = [stream(folder_fp32_zarr, rank=r, world_size=4, batch_size=1).plan(0) for r in range(4)]
    rows = [r for p in plans for b in p for r in b]
    assert len(rows) == len(set(rows)) == 4  # 6 images over 4 ranks: 1 each, the remainder dropped evenly
    assert {len(p) for p in plans} == {1}


def test_wds_streams_whole_shards_through_a_buffer(folder_fp16_wds):
    s = stream(folder_fp16_wds, batch_size=1, shuffle_buffer=2)
    per_shard = s.cache.manifest["store"]["records_per_shard"]
    for epoch in range(2):
        plans = [s.plan(epoch, w, 2) for w in range(2)]
        rows = [r for p in plans for b in p for r in b]
        assert sorted(rows) == s.epoch_items(epoch)
        shards = [{r // per_shard for b in p for r in b} for p in plans]
        assert not shards[0] & shards[1]  # each shard is read by one worker only
    with pytest.raises(AttncacheError, match="cannot feed 3 ranks"):
        stream(folder_fp16_wds, world_size=3).plan(0)


def test_batches_carry_the_cached_fields_in_batch_order(folder_fp32_zarr, image_folder):
    s = stream(folder_fp32_zarr, image_folder, batch_size=3)
    cache = open_cache(str(folder_fp32_zarr))
    batches = list(s)
    assert [b["index"] for b in batches] == [0, 1]
    for b in batches:
        rows = b["rows"].tolist()
        torch.testing.assert_close(cache.codec.decode(b["fields"]), cache.read_rows(rows), rtol=0, atol=0)
        assert b["labels"].tolist() == [cache.samples[r % 6]["label"] for r in rows]
        assert b["images"].shape == (3, 3, 32, 32)
    # resume: skip the batches already trained on, without reading them
    s2 = stream(folder_fp32_zarr, image_folder, batch_size=3)
    s2.resume_at(0, {0: 1})
    rest = list(s2)
    assert [b["index"] for b in rest] == [1] and torch.equal(rest[0]["rows"], batches[1]["rows"])
    assert [b["epoch"] for b in s2] == [1, 1]  # the next iteration is the next epoch, in full

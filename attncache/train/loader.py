"""Training input: batches of (rendered view, label, compact teacher-map fields) from a cache, or live views.

**One sequence of batches per epoch.** An epoch's batches are a pure function of (seed, epoch, rank, world size,
batch size), computed before any byte is read:
- cache: one view per image (epoch e reads view e mod K; records are view-major, so these rows are contiguous);
  zarr caches take a global permutation, webdataset caches a locality-preserving one (shards in shuffled order,
  then rows shuffled within windows of `shuffle_buffer` rows, so a batch reads from few shards);
- live (no cache): the samples in a permuted order, views drawn per epoch from a `ViewPolicy`;
- the order is split by rank (strided) and cut into batches; with `drop_last` (training) every epoch and every rank
  has exactly floor(items / (batch x world)) batches.
All of it is numpy over arrays of row numbers (an epoch of 1.28M images plans in well under a second), and a
record's sample and view are read from the cache's tables when its batch is loaded, never held for all records.

**Workers deal from that one sequence.** DataLoader worker j of n yields the epoch's batches start + j, start + j + n,
..., which is exactly the order the DataLoader yields them in (round robin from worker 0). So the sequence does not
depend on the number of workers, and resuming at batch `start` of an epoch is exact whatever the per-worker
progress was (and with any worker count). Workers are persistent: the main process sets (epoch, start) in shared
memory before each `iter(loader)`, and the workers' stores stay open across epochs.

Each record's image is joined by key from `data` (or taken from the cache when it carries the images), checked
against the sha256 recorded at extraction, and rendered with the same `views.render` as extraction; a mixed view's
partner image is read and checked the same way, and the batch carries the partner labels and lambdas the labels
are mixed with. Maps leave the
worker as the codec's compact fields; decoding happens on the training device. Workers start through forkserver
(spawn where there is none): zarr and fsspec run an asyncio loop in a background thread, which a worker forked from
the training process would inherit in an unusable state.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..cache import Cache
from ..errors import AttncacheError
from ..sources import Source, open_image
from ..store.format import row_of
from ..views import View, ViewPolicy, drop_path_keep, render


@dataclass(frozen=True)
class RenderSpec:
    """How views become pixels: the teacher's input size, interpolation and normalisation."""

    size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def of(cls, teacher) -> RenderSpec:
        return cls(teacher.image_size, teacher.interpolation, tuple(teacher.mean), tuple(teacher.std))


class ViewStream(IterableDataset):
    """Yields ready batches: {"images", "labels", "rows", "fields", "epoch", "index"}, plus "partner_labels" and
    "lam" where views are mixed and "drop_path_keep" (B, depth) where they carry the teacher's drop-path masks
    (or {"error": msg})."""

    def __init__(self, *, render_spec: RenderSpec, batch_size: int, shuffle: bool, seed: int = 0,
                 cache: Cache | None = None, with_maps: bool = True, source: Source | None = None,
                 samples: list[dict] | None = None, policy: ViewPolicy | None = None,
                 rank: int = 0, world_size: int = 1, shuffle_buffer: int = 2048, drop_last: bool | None = None,
                 depth: int | None = None):
        """A `cache` (views and maps; images from `source` unless embedded), or live `samples` + `policy` (with
        the teacher's `depth` when the policy draws drop-path masks)."""
        if cache is None and (samples is None or policy is None):
            raise ValueError("a live stream needs samples and a view policy")
        self.render_spec, self.batch_size, self.shuffle, self.seed = render_spec, batch_size, shuffle, seed
        self.cache, self.with_maps, self.source = cache, with_maps, source
        self._samples, self.policy = samples, policy
        self.rank, self.world_size, self.shuffle_buffer = rank, world_size, shuffle_buffer
        self.depth = depth
        self._key_index: dict[str, int] | None = None  # live views: mixing partners by key, built on first use
        self.drop_last = shuffle if drop_last is None else drop_last
        self._position = [0, 0]  # (epoch, first batch); shared memory once a multi-process loader is made
        self._shared_items = None  # this rank's items of the epoch, in shared memory for the loader's workers

    def keys(self) -> list[str]:
        """Every sample's key, in sample order."""
        if self.cache is None:
            return [s["key"] for s in self._samples]
        return [key for chunk in self.cache.iter_keys() for key in chunk]

    @property
    def mixes(self) -> bool:
        return (self.cache.policy if self.cache is not None else self.policy).augment.mixes

    def _partner(self, view: View) -> dict:
        """The sample a mixed view is mixed with: by its index in a cache, by key among live samples."""
        if self.cache is not None:  # with its index: a cache that embeds images holds the partner's at that row
            return {**self.cache.sample_at(view.mix.partner_index), "index": view.mix.partner_index}
        if self._key_index is None:
            self._key_index = {s["key"]: i for i, s in enumerate(self._samples)}
        return self._samples[self._key_index[view.mix.partner]]

    def set_position(self, epoch: int, start: int = 0) -> None:
        """The next iteration yields `epoch`'s batches from index `start` on (set before `iter(loader)`). With
        workers, the epoch's plan is drawn here, once, into memory they share: not once per worker (an ImageNet
        epoch's order is 10 MB and 0.1 s, which 8 workers per rank would each hold and draw)."""
        self._position[0], self._position[1] = epoch, start
        if self._shared_items is not None:
            items = self.rank_items(epoch)
            np.frombuffer(self._shared_items, np.int64)[:len(items)] = items

    # -- what to read ----------------------------------------------------------------------------------------

    def epoch_items(self, epoch: int) -> np.ndarray:
        """Cache rows (one view per image) or sample indices (live) of an epoch, in storage order."""
        if self.cache is None:
            return np.arange(len(self._samples), dtype=np.int64)
        view = epoch % self.cache.views_per_image if self.shuffle else 0  # evaluation: always the first view
        n = self.cache.num_samples
        return np.arange(row_of(0, view, n), row_of(0, view, n) + n, dtype=np.int64)

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's items in the order they are trained on (before the rank split)."""
        items = self.epoch_items(epoch)
        if not self.shuffle:
            return items
        if self.cache is not None and self.cache.manifest["store"]["format"] == "wds":
            return self._streamed_order(items, epoch)
        return np.random.default_rng([self.seed, epoch]).permutation(items)

    def _streamed_order(self, rows: np.ndarray, epoch: int) -> np.ndarray:
        """Shards in shuffled order, then rows shuffled within windows of `shuffle_buffer` rows (window edges
        moved by a random offset each epoch): a batch's rows come from few shards. The epoch's rows are one
        contiguous range, so every shard's part of it is too."""
        per_shard = self.cache.manifest["store"]["records_per_shard"]
        rng = np.random.default_rng([self.seed, epoch])
        first, last = int(rows[0]) // per_shard, int(rows[-1]) // per_shard
        shards = rng.permutation(np.arange(first, last + 1))
        starts = np.maximum(shards * per_shard, rows[0])
        stops = np.minimum((shards + 1) * per_shard, rows[-1] + 1)
        lengths = stops - starts
        # rows of the shards in their shuffled order: each shard's start repeated over its length, plus 0, 1, ...
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        ordered = np.repeat(starts, lengths) + offsets
        window = max(1, self.shuffle_buffer)
        shift = int(rng.integers(window))
        keys = (np.arange(len(ordered)) + shift) // window + rng.random(len(ordered))
        return ordered[np.argsort(keys, kind="stable")]

    def rank_items(self, epoch: int) -> np.ndarray:
        """This rank's items of `epoch` in training order: its batches are consecutive slices of `batch_size`."""
        order = self.order(epoch)
        return order[self.rank:self._usable(len(order)):self.world_size]

    def _usable(self, items: int) -> int:
        step = self.batch_size * self.world_size
        return items // step * step if self.drop_last else items

    def _rank_count(self) -> int:
        """How many items this rank has in every epoch (arithmetic: an epoch always has the same number)."""
        items = self.cache.num_samples if self.cache is not None else len(self._samples)  # = len(epoch_items)
        return len(range(self.rank, self._usable(items), self.world_size))

    def plan(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches (arrays of items) of `epoch`, in training order."""
        mine = self.rank_items(epoch)
        return [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)]

    def batches_per_epoch(self) -> int:
        """The same for every epoch (and, with drop_last, every rank): arithmetic, no plan is drawn."""
        return -(-self._rank_count() // self.batch_size)

    # -- reading -----------------------------------------------------------------------------------------------

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, start = int(self._position[0]), int(self._position[1])
        try:
            if self._shared_items is not None:  # drawn by the training process (set_position)
                mine = np.frombuffer(self._shared_items, np.int64)[:self._rank_count()]
            else:
                mine = self.rank_items(epoch)
            for index in range(start + worker, -(-len(mine) // self.batch_size), num_workers):
                batch = mine[index * self.batch_size:(index + 1) * self.batch_size]
                yield {**self.load(epoch, batch.tolist()), "epoch": epoch, "index": index}
        except AttncacheError as exc:  # reported by the training process as a one-line error
            yield {"error": str(exc)}

    def load(self, epoch: int, items: list[int]) -> dict:
        if self.cache is None:
            return self._load_live(epoch, items)
        cache = self.cache
        fields = {}
        if self.with_maps:
            order = np.argsort(items, kind="stable")  # storage order: one pass per shard
            raw = cache.read_fields([items[j] for j in order])
            inverse = torch.from_numpy(np.argsort(order, kind="stable"))
            fields = {name: a[inverse].contiguous() for name, a in raw.items()}
        embedded = cache.manifest["store"]["embed_images"]
        blobs = cache.reader.read_images(items) if embedded else [None] * len(items)
        views = [(cache.sample(row), cache.view(row), blob) for row, blob in zip(items, blobs, strict=True)]
        return {**self._render_batch(views), "rows": torch.tensor(items, dtype=torch.int64), "fields": fields}

    def _load_live(self, epoch: int, items: list[int]) -> dict:
        policy, r = self.policy, self.render_spec
        if policy.split == "train":  # a fresh draw every epoch, still a pure function of (seed, epoch, key)
            policy = replace(policy, views_per_image=1, seed=self.seed * 1_000_003 + epoch)
        views = [(self._samples[i], policy.view(self._samples, i, 0, r.size, mean=r.mean,
                                                interpolation=r.interpolation, depth=self.depth), None)
                 for i in items]
        return {**self._render_batch(views), "rows": torch.tensor(items, dtype=torch.int64), "fields": {}}

    def _render_batch(self, views: list[tuple[dict, View, bytes | None]]) -> dict:
        """Pixels and labels of (sample, view, image bytes or None) triples; partner labels and lambdas too when
        the stream mixes (lam 1 and the view's own label for a view that happens not to be mixed)."""
        images, labels, partner_labels, lams = [], [], [], []
        for sample, view, blob in views:
            partner = None
            if view.mix is not None:
                partner = self._partner(view)
            images.append(self._render(sample, view, blob, partner))
            labels.append(sample["label"])
            partner_labels.append(partner["label"] if partner is not None else sample["label"])
            lams.append(view.mix.lam if view.mix is not None else 1.0)
        out = {"images": torch.stack(images), "labels": torch.tensor(labels, dtype=torch.int64)}
        keep, _ = drop_path_keep([view for _, view, _ in views])
        if keep is not None:
            out["drop_path_keep"] = keep
        if self.mixes:
            out.update(partner_labels=torch.tensor(partner_labels, dtype=torch.int64),
                       lam=torch.tensor(lams, dtype=torch.float64))
        return out

    def _image(self, sample: dict, blob: bytes | None):
        """The decoded image of `sample`, from `blob` or read by key, after checking its sha256."""
        key = sample["key"]
        where = self.source.where(key) if self.source is not None else f"{self.cache.root}:{key}"
        if blob is None:
            if self.source is None:  # a mixing partner of a cache that embeds its images
                partner_row = row_of(sample["index"], 0, self.cache.num_samples)
                blob = self.cache.reader.read_images([partner_row])[0]
            else:
                blob = self.source.read_key(key)
        if hashlib.sha256(blob).hexdigest() != sample["sha256"]:
            raise AttncacheError(f"image {where} differs from the one the cache was extracted from (sha256 "
                                 "mismatch): its cached maps belong to other pixels")
        return open_image(blob, where)

    def _render(self, sample: dict, view: View, blob: bytes | None, partner: dict | None = None) -> torch.Tensor:
        r = self.render_spec
        partner_image = self._image(partner, None) if partner is not None else None
        return render(self._image(sample, blob), view, r.size, r.interpolation, r.mean, r.std, partner=partner_image)


def make_loader(stream: ViewStream, workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over ready batches; with workers, persistent ones that read their position from shared
    memory (see the module docstring), and a private generator so that no global RNG is drawn from."""
    generator = torch.Generator().manual_seed(0)
    if not workers:
        return DataLoader(stream, batch_size=None, num_workers=0, generator=generator)
    ctx = _worker_context()
    epoch, start = stream._position
    stream._position = ctx.Array("q", [epoch, start], lock=False)
    stream._shared_items = ctx.RawArray("q", max(1, stream._rank_count()))
    stream.set_position(epoch, start)
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory, generator=generator,
                      multiprocessing_context=ctx, persistent_workers=True, prefetch_factor=4)


def _worker_context():
    """forkserver where available: workers fork from a clean server process that has imported torch and timm
    once (cheap to start) but never opened a store (no inherited asyncio thread); spawn elsewhere."""
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["attncache.train.loader"])
    return ctx


def batches(loader: DataLoader):
    """Iterate a loader, turning a worker's reported error into an AttncacheError here."""
    for batch in loader:
        if "error" in batch:
            raise AttncacheError(batch["error"])
        yield batch


def eval_stream(val_cache: Cache | None, source: Source | None, teacher, num_classes: int, batch_size: int,
                with_maps: bool) -> ViewStream | None:
    """The evaluation views: a val cache's (joined to `source` unless embedded), else timm's eval crops of
    `source`'s images."""
    if val_cache is None and source is None:
        return None
    common = dict(render_spec=RenderSpec.of(teacher), batch_size=batch_size, shuffle=False, source=source)
    if val_cache is not None:
        check_images(val_cache, source, "val_cache", "val_data")
        stream = ViewStream(cache=val_cache, with_maps=with_maps, **common)
        low, high = val_cache.label_range()
        if not 0 <= low <= high < num_classes:
            raise AttncacheError(f"`val_cache` {val_cache.root}: labels {low}..{high}, outside the {num_classes} "
                                 "training classes")
    else:
        samples = [s.to_json() for s in source.scan()]
        stream = ViewStream(samples=samples, policy=ViewPolicy(split="val", crop_pct=teacher.crop_pct), **common)
        bad = next((s for s in samples if not 0 <= s["label"] < num_classes), None)
        if bad is not None:
            raise AttncacheError(f"validation sample {bad['key']!r}: label {bad['label']} outside the "
                                 f"{num_classes} training classes")
    return stream


SPOT_CHECKS = 8  # images hashed before a run starts (the rest are checked as they are read)


def check_images(cache: Cache, source: Source | None, cache_option: str, data_option: str) -> None:
    """Before training: every cached key is found in `source`, and a few of them hash to what was extracted.
    The options are the names of the ones that gave the cache and the source (`cache` and `data`)."""
    if cache.manifest["store"]["embed_images"]:
        return
    if source is None:
        raise AttncacheError(f"`{cache_option}` {cache.root} does not embed images: pass `{data_option}`")
    # The cache's key index against the source's, as two sorted arrays of key hashes (a chunk of the cache's at a
    # time): 1.28M ImageNet keys cost ~0.1 s, not ~10 s of a lookup per key. A hash that matches another key
    # could only pass a missing image here; training checks each image's sha256 when it reads it.
    have = source.key_hashes()
    missing, first = 0, cache.num_samples  # how many are absent, and the first of them in sample order
    for rows in cache.records.iter_key_hashes():
        at = np.minimum(np.searchsorted(have, rows["hash"]), max(0, len(have) - 1))
        absent = np.flatnonzero(have[at] != rows["hash"]) if len(have) else np.arange(len(rows))
        if len(absent):
            first = min(first, int(rows["sample"][absent].min()))
        missing += len(absent)
    if missing:
        example = cache.sample_at(first)["key"]
        raise AttncacheError(f"`{data_option}` {source.description}: {missing} cached image(s) not found, "
                             f"e.g. {example!r}")
    n = cache.num_samples
    spread = np.linspace(0, n - 1, min(SPOT_CHECKS, n)).astype(int)
    for i in sorted(set(spread.tolist())):
        sample = cache.sample_at(i)
        if hashlib.sha256(source.read_key(sample["key"])).hexdigest() != sample["sha256"]:
            raise AttncacheError(f"`{data_option}` {source.where(sample['key'])}: differs from the image "
                                 f"`{cache_option}` {cache.root} was extracted from (sha256 mismatch): wrong "
                                 f"`{data_option}`?")

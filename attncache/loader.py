"""Training input: batches of (rendered view, label, compact teacher-map fields) from a cache, or live views.

Cache side: an epoch uses one view per image (epoch e reads view e mod K; records are view-major, so these are
contiguous rows). Zarr caches are shuffled globally; webdataset caches by shard order plus a shuffle buffer, so each
worker streams whole shards. The image of each record is joined by key from `--data` (or taken from the cache when
it was extracted with --embed-images), checked against the sha256 recorded at extraction, and rendered with the same
`views.render` as extraction. Maps leave the worker as the codec's compact fields; decoding happens on the
training device (`Cache.codec.decode`).

Live side (no cache): samples from an image source, one view per image and epoch drawn from a `ViewPolicy`.

The batches of an epoch are a pure function of (seed, epoch, rank, world size), computed before any byte is read,
so a resumed run skips the batches it already trained on without reading them. Zarr and live streams assign the
epoch's global batch list round-robin to workers, which is exactly the order a DataLoader yields them in: the
sequence of batches does not depend on the number of workers.

DataLoader workers are started by forkserver (spawn where there is none) and open the cache themselves: zarr and
fsspec run an asyncio loop in a background thread, which a worker forked from the training process would inherit
in an unusable state.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .data import Source, open_image
from .errors import AttncacheError
from .store.format import row_of, sample_and_view
from .views import View, ViewPolicy, render


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
    """Yields ready batches: {"images", "labels", "rows", "fields", "worker", "index"} (or {"error": msg})."""

    def __init__(self, *, render_spec: RenderSpec, batch_size: int, shuffle: bool, seed: int = 0,
                 cache=None, cache_root: str | None = None, with_maps: bool = True, source: Source | None = None,
                 samples: list[dict] | None = None, policy: ViewPolicy | None = None,
                 rank: int = 0, world_size: int = 1, shuffle_buffer: int = 2048, drop_last: bool | None = None):
        """`cache` (an open Cache, reused in this process) or `cache_root`; or live `samples` + `policy`."""
        cache_root = cache.root if cache is not None else cache_root
        if cache_root is None and (samples is None or policy is None):
            raise ValueError("a live stream needs samples and a view policy")
        self.render_spec, self.batch_size, self.shuffle, self.seed = render_spec, batch_size, shuffle, seed
        self.cache_root, self.with_maps, self.source = cache_root, with_maps, source
        self._samples, self.policy = samples, policy
        self.rank, self.world_size, self.shuffle_buffer = rank, world_size, shuffle_buffer
        self.drop_last = shuffle if drop_last is None else drop_last
        self.start_epoch, self._skip, self._iterations = 0, {}, 0
        self._cache = cache

    def __getstate__(self):  # workers open their own cache (see module docstring)
        return {**self.__dict__, "_cache": None}

    # -- what to read ----------------------------------------------------------------------------------------

    @property
    def cache(self):
        if self._cache is None and self.cache_root is not None:
            from .cache import open_cache

            self._cache = open_cache(self.cache_root)
        return self._cache

    @property
    def samples(self) -> list[dict]:
        return self.cache.samples if self.cache_root is not None else self._samples

    def epoch_items(self, epoch: int) -> list[int]:
        """Cache rows (one view per image) or sample indices (live) of an epoch, in storage order."""
        if self.cache_root is None:
            return list(range(len(self._samples)))
        view = epoch % self.cache.views_per_image if self.shuffle else 0  # evaluation: always the first view
        return [row_of(i, view, self.cache.num_samples) for i in range(self.cache.num_samples)]

    def plan(self, epoch: int, worker: int = 0, num_workers: int = 1) -> list[list[int]]:
        """This worker's batches (lists of items) for `epoch`, in the order they are yielded."""
        items = self.epoch_items(epoch)
        if self.shuffle and self.cache_root is not None and self.cache.manifest["store"]["format"] == "wds":
            return self._chunk(self._streamed_order(items, epoch, worker, num_workers))
        if self.shuffle:
            items = np.random.default_rng([self.seed, epoch]).permutation(items).tolist()
        usable = len(items) // self.world_size * self.world_size if self.drop_last else len(items)
        batches = self._chunk(items[self.rank:usable:self.world_size])
        return batches[worker::num_workers]

    def _streamed_order(self, rows: list[int], epoch: int, worker: int, num_workers: int) -> list[int]:
        """webdataset order: shuffled shards split by rank then worker, rows through a shuffle buffer."""
        per_shard = self.cache.manifest["store"]["records_per_shard"]
        shards = sorted({r // per_shard for r in rows})
        if len(shards) < self.world_size:
            raise AttncacheError(f"{self.cache_root}: {len(shards)} shards per epoch cannot feed {self.world_size} "
                                 "ranks (each rank needs a shard); re-extract with smaller --shard-records")
        rng = np.random.default_rng([self.seed, epoch])
        mine = rng.permutation(shards).tolist()[self.rank::self.world_size][worker::num_workers]
        wanted = set(rows)
        stream = [r for s in mine for r in range(s * per_shard, (s + 1) * per_shard) if r in wanted]
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
        out, buffer = [], []
        for row in stream:
            buffer.append(row)
            if len(buffer) >= self.shuffle_buffer:
                j = int(rng.integers(len(buffer)))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                out.append(buffer.pop())
        rng.shuffle(buffer)
        return out + buffer

    def _chunk(self, items: list[int]) -> list[list[int]]:
        batches = [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def resume_at(self, epoch: int, consumed: dict[int, int]) -> None:
        """Start at `epoch`, skipping the batches each worker already delivered (from a checkpoint)."""
        self.start_epoch, self._skip, self._iterations = epoch, {int(k): int(v) for k, v in consumed.items()}, 0

    # -- reading -----------------------------------------------------------------------------------------------

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.start_epoch + self._iterations
        skip = self._skip.get(worker, 0) if self._iterations == 0 else 0
        self._iterations += 1
        try:
            batches = self.plan(epoch, worker, num_workers)
            for index in range(skip, len(batches)):
                yield {**self.load(epoch, batches[index]), "worker": worker, "index": index, "epoch": epoch}
        except AttncacheError as exc:  # reported by the training process as a one-line error
            yield {"error": str(exc)}

    def load(self, epoch: int, items: list[int]) -> dict:
        if self.cache_root is None:
            return self._load_live(epoch, items)
        cache = self.cache
        fields = {}
        if self.with_maps:
            order = np.argsort(items, kind="stable")  # storage order: one pass per shard
            raw = cache.reader.read([items[j] for j in order])
            inverse = np.empty_like(order)
            inverse[order] = np.arange(len(order))
            fields = {name: torch.from_numpy(np.ascontiguousarray(a[inverse])) for name, a in raw.items()}
        embedded = cache.manifest["store"].get("embed_images")
        blobs = cache.reader.read_images(items) if embedded else [None] * len(items)
        images, labels = [], []
        for row, blob in zip(items, blobs, strict=True):
            sample = cache.samples[sample_and_view(row, cache.num_samples)[0]]
            view = cache.view(row)
            images.append(self._render(sample, view, blob))
            labels.append(sample["label"])
        return {"images": torch.stack(images), "labels": torch.tensor(labels, dtype=torch.int64),
                "rows": torch.tensor(items, dtype=torch.int64), "fields": fields}

    def _load_live(self, epoch: int, items: list[int]) -> dict:
        policy = self.policy
        if policy.split == "train":  # a fresh draw every epoch, still a pure function of (seed, epoch, key)
            policy = dataclasses.replace(policy, views_per_image=1, seed=self.seed * 1_000_003 + epoch)
        images = []
        for i in items:
            sample = self._samples[i]
            view = policy.draw(sample["key"], sample["width"], sample["height"])[0]
            images.append(self._render(sample, view, None))
        return {"images": torch.stack(images), "rows": torch.tensor(items, dtype=torch.int64), "fields": {},
                "labels": torch.tensor([self._samples[i]["label"] for i in items], dtype=torch.int64)}

    def _render(self, sample: dict, view: View, blob: bytes | None) -> torch.Tensor:
        key = sample["key"]
        if blob is None:
            try:
                blob = self.source.read_key(key)
            except (KeyError, FileNotFoundError) as exc:
                raise AttncacheError(f"image {key!r}: not found in {self.source.description}") from exc
        if hashlib.sha256(blob).hexdigest() != sample["sha256"]:
            where = self.source.description if self.source is not None else self.cache_root
            raise AttncacheError(f"image {key!r} in {where} differs from the one the cache was extracted from "
                                 "(sha256 mismatch): its cached maps belong to other pixels")
        r = self.render_spec
        return render(open_image(blob, key), view, r.size, r.interpolation, r.mean, r.std)


def make_loader(stream: ViewStream, workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over ready batches with persistent workers (each new iteration is the next epoch)."""
    extra = dict(multiprocessing_context=_worker_context(), persistent_workers=True, prefetch_factor=4) \
        if workers else {}
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory, **extra)


def _worker_context():
    """forkserver where available: workers fork from a clean server process that has imported torch and timm
    once (cheap to start) but never opened a store (no inherited asyncio thread); spawn elsewhere."""
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["attncache.loader", "attncache.cache", "timm"])
    return ctx


def batches(loader: DataLoader):
    """Iterate a loader, turning a worker's reported error into an AttncacheError here."""
    for batch in loader:
        if "error" in batch:
            raise AttncacheError(batch["error"])
        yield batch

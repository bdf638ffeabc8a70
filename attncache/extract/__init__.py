"""`attncache extract`: run a frozen teacher once over a dataset and write its attention maps to a cache.

Order of work, cheapest checks first: options (config.py), the paths (`--data` readable, `--out` writable, free or
ours), teacher, the source's listing (a finished cache of the same plan stops here: nothing to do), the free space
(`--out` must have room for the estimated cache), the scan (every image hashed and decoded, so a corrupt one is
named before the teacher runs), the claim of `--out` (plan.py), then the pipeline over the shards not yet complete
(pipeline.py), and the manifest, written last. A disk that fills up anyway stops it with one line (files.py):
every write is whole or absent, so the same command resumes once there is room.

Many processes: under torchrun every rank runs `extract()`; rank 0 scans, claims and writes the plan, index files and
store metadata, then each rank writes the whole shards s with s mod world = rank, and rank 0 writes the manifest
after a barrier. Independent jobs (`--num-shards S --shard-index i`, a SLURM array) each take the shards s with
s mod S = i (and split them over their own ranks); the last one to finish writes the manifest, or `merge()` does.
Shards, batches and bytes do not depend on how the work was split.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ..codecs.inputs_klt import basis_bytes, fit_basis, load_basis
from ..device import parse_device
from ..distributed import World
from ..errors import AttncacheError, DiskFullError
from ..files import atomic_write_bytes, disk_full_names, free_bytes, read_json
from ..rundir import FINISHED
from ..sources import open_source
from ..store import WRITERS
from ..store.format import (
    BASIS,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    PLAN,
    PROJECTIONS,
    dataset_fingerprint,
    sample_and_view,
)
from ..store.fs import is_url
from ..store.records import Layout, write_tables
from ..teacher import AttentionCapture, parse_layers
from ..teacher.projections import from_model, projections_bytes
from ..views import View, ViewPolicy
from . import plan as plans
from .config import ExtractConfig, check_options, check_paths
from .pipeline import Work, capture_rows, run_pipeline

__all__ = ["ExtractConfig", "extract", "merge"]

# The free-space check refuses only when the room is clearly too small: under half the estimate (a cache's maps may
# compress better than the teacher the ratios were measured on, e.g. 0.66 of the estimate on a random-init teacher).
FREE_SPACE_MARGIN = 0.5


def extract(cfg: ExtractConfig, on_shard: Callable[[int], None] | None = None, stats: dict | None = None,
            on_claim: Callable[[], None] | None = None) -> dict:
    """Run, resume or repair an extraction; returns the manifest.

    `on_shard(i)` is called after shard i is durable, `on_claim()` once the plan is written; `stats`, if given,
    receives the pipeline's wall time and the number of records it processed (for benchmarks and tests).
    An `--out` URL (s3://...) is extracted into a local staging directory and published as it goes (publish.py).
    """
    if is_url(cfg.out):
        return _extract_to_url(cfg, on_shard, stats)
    with disk_full_names(cfg.out):  # ENOSPC from a write files.py does not make is one line too
        return _extract_local(cfg, on_shard, stats, on_claim)


def _extract_local(cfg: ExtractConfig, on_shard, stats, on_claim) -> dict:
    codec = check_options(cfg)
    check_paths(cfg)
    out = Path(cfg.out)
    plans.check_out_is_free(out)
    source = open_source(cfg.data, cfg.split, cfg.limit)  # cheap (nothing listed yet); names a missing --data
    if cfg.augment.mixes and source.streamed:
        raise AttncacheError(f"--data {cfg.data}: mixing reads each view's partner image by key, which a streamed "
                             "(pipe:) source cannot do; use local or HTTP(S) shards")
    device = parse_device(cfg.device)
    world = World.from_env(device)  # torchrun: every rank runs this function, each on its own shards
    device = world.device(device)
    model, spec = cfg.teacher.build(device)
    layers = parse_layers(cfg.layers, spec.depth)
    payload = cfg.payload or codec.payloads[0]
    policy = ViewPolicy(split=cfg.split, views_per_image=cfg.views, seed=cfg.seed,
                        crop_pct=spec.crop_pct if cfg.split == "val" else 0.875, augment=cfg.augment)
    shape = spec.capture_shape(len(layers))
    fields = codec.fields(shape)
    entries = source.entries()
    records = len(entries) * policy.views_per_image
    per_shard = min(records, cfg.records_per_shard or
                    plans.default_records_per_shard(sum(f.nbytes for f in fields.values())))
    head = {
        "teacher": spec.to_json(),
        "capture": {"layers": layers, "payload": payload, "map_shape": list(shape.map_shape), "dtype": "float32"},
        "codec": {**codec.to_json(), "fields": {k: v.to_json() for k, v in fields.items()}},
        "views": policy.to_json(),
        "store": {"format": cfg.format, "records": records, "records_per_shard": per_shard,
                  "embed_images": cfg.embed_images},
    }
    dataset_head = {"num_samples": len(entries), "classes": source.classes, "source": source.description}
    if stats is not None:
        stats.update(pipeline_s=0.0, records=0)
    if not cfg.repair and (done := plans.finished_unchanged(out, head, dataset_head,
                                                            [e.key for e in entries])) is not None:
        _log(cfg, f"{out}: finished cache of this plan, nothing to do (`attncache verify` re-hashes it)")
        return done
    if world.is_main and not cfg.ignore_free_space:
        check_free_space(out, codec, shape, records)

    # One rank hashes and decodes every image and writes the record tables; the others read them from the disk
    # once the plan is claimed (the cache's own files, not a copy of every sample in every rank's memory).
    samples = None
    if world.is_main:  # what it hashes is logged as it goes: a killed scan resumes where it stopped
        _log(cfg, f"scanning {source.description} ({len(entries)} images) ...")
        scanned = source.scan(cfg.workers, plans.load_scan(out), on_progress=plans.scan_logger(out),
                              every=plans.SCAN_LOG_EVERY)
        samples = [s.to_json() for s in scanned]
        del scanned
    index_files = {}
    if codec.needs_projections:  # the cache carries what decoding needs (teacher/projections.py)
        index_files[PROJECTIONS] = projections_bytes(model, layers)
    drawn = DrawnViews(policy, samples, spec) if world.is_main else None
    if codec.needs_basis:  # fitted once on calibration views, before any shard is coded in it
        fit_work = Work(out, spec, source, samples, drawn, per_shard, records, cfg.embed_images)
        index_files[BASIS] = _basis(cfg, out, head, fit_work, codec, model, layers, payload, device, world)
        codec.bind_basis(load_basis(index_files[BASIS], len(layers), spec.embed_dim, BASIS))
    plan = None
    if world.is_main:
        plan = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,  # per-chunk checksums, a sealed manifest and record tables
            **head,
            "dataset": {**dataset_head, "fingerprint": dataset_fingerprint(samples)},
            "files": {name: plans.index_file_entry(name, data) for name, data in index_files.items()},
        }
    part = cfg.num_shards > 1  # one of several independent jobs (a SLURM array): claim, write, leave the rest
    run_dir = plans.cache_dir(out)
    with run_dir:
        writer, error = None, None
        if world.is_main:
            try:
                state = run_dir.claim(plan, shared=part)
                if state == FINISHED:  # same plan, but a file is damaged or --repair asked for a full check
                    plans.reopen_finished(out)
                if on_claim is not None:
                    on_claim()
                plans.save_scan(out, samples, [e.stamp for e in entries])
                for name, data in index_files.items():
                    atomic_write_bytes(out / name, data)
                if not plans.tables_done(out, cfg.repair):
                    _log(cfg, f"writing the record tables ({records} views) ...")
                    plans.write_tables_marker(out, write_tables(out, samples, drawn, Layout.of(plan)))
                writer = WRITERS[cfg.format](out, fields, codec.compressor(), records, per_shard, cfg.embed_images)
            except AttncacheError as exc:
                error = str(exc)
            if part:
                run_dir.release()  # the other parts write their own shards meanwhile
        # the plan, index files and store metadata exist before any rank writes a shard (or every rank stops)
        error = world.broadcast(error)
        if error is not None:
            raise AttncacheError(error)
        if writer is None:
            writer = WRITERS[cfg.format](out, fields, codec.compressor(), records, per_shard, cfg.embed_images)
        del samples, drawn, entries  # from here on every rank reads the samples and views from the tables
        tables = plans.open_tables(out)
        work = Work(out, spec, source, tables.samples_seq(), tables.views_seq(), per_shard, records,
                    cfg.embed_images)
        shards = plans.num_shards(records, per_shard)
        mine = plans.shards_of(shards, cfg.num_shards * world.size, cfg.shard_index * world.size + world.rank)
        pending = [s for s in mine if not plans.shard_done(out, s, writer.shard_paths(s), cfg.repair)]
        who = f"part {cfg.shard_index + 1}/{cfg.num_shards}, " if part else ""
        who += f"rank {world.rank}/{world.size}: " if world.distributed else ""
        _log(cfg, f"{who}{len(mine)} of {shards} shards ({records} records in all), {len(mine) - len(pending)} "
                  "already complete")
        start = time.perf_counter()
        if pending:
            with AttentionCapture(model, layers, payload) as capture:
                run_pipeline(work, pending, capture, codec, writer, batch_size=cfg.batch_size,
                             workers=cfg.workers, device=device, amp=cfg.amp, progress=cfg.progress,
                             on_shard=on_shard)
        done = sum(min(per_shard, records - s * per_shard) for s in pending)
        seconds = time.perf_counter() - start
        if stats is not None:
            stats.update(pipeline_s=seconds, records=done)
        if world.distributed:  # throughput per rank and in total, said once by rank 0
            per_rank = world.gather((done, seconds))
            total = sum(r for r, _ in per_rank) / max(1e-9, max(t for _, t in per_rank))
            if world.is_main:
                _log(cfg, f"{sum(r for r, _ in per_rank)} records: {total:.1f} views/s in total; per rank "
                          + ", ".join(f"{r / max(1e-9, t):.1f}" for r, t in per_rank))
        world.barrier()
        manifest = None
        if world.is_main:
            if part:  # the part that finishes last writes the manifest; the others leave it to it (or to merge)
                run_dir.lock()
                manifest = plans.finish(out, required=False)
                if manifest is None:
                    _log(cfg, f"{who}done; the cache is complete once every part is (`attncache merge {out}`)")
            else:
                manifest = plans.finish(out)
        manifest = world.broadcast(manifest)
    return manifest


def estimated_bytes(codec, shape, records: int) -> tuple[int, float]:
    """(bytes of the cache's shards and index files, bytes per view) as `attncache plan` estimates them: each
    record's raw field bytes times the codec's measured compression ratio (docs/costs.md); a codec with other
    parameters than the measured ones takes its smallest measured ratio, one never measured (fp32) none."""
    from ..tools import costs

    ratio = costs.measured_ratio_of(codec)
    if ratio is None:
        same = [costs.parse_codec(spec) for spec in costs.MEASURED_BYTES_PER_VIEW]
        ratio = min((costs.measured_ratio_of(c) for c in same if c.name == codec.name), default=1.0)
    per_view = costs.raw_bytes(codec, shape) * ratio
    side = costs.side_file_bytes(codec, shape.layers, shape.heads * shape.head_dim)
    return int(per_view * records + side), per_view


def check_free_space(out: Path, codec, shape, records: int) -> None:
    """Refuse an `--out` (the staging directory of a remote one) whose filesystem clearly cannot hold what is left
    to write: the estimate less the bytes already there (a resumed extraction needs only the rest)."""
    total, per_view = estimated_bytes(codec, shape, records)
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and not p.is_symlink()) \
        if out.is_dir() else 0
    needed, free = total - written, free_bytes(out)
    if free < needed * FREE_SPACE_MARGIN:
        raise DiskFullError(f"{out}: the cache needs about {needed:,} more bytes ({records} records of "
                            f"~{per_view:,.0f} bytes), its filesystem has {free:,} free; free some space or choose "
                            "another --out (--stage for a remote one), or pass --ignore-free-space to start anyway "
                            "(a full disk stops it cleanly, and it resumes)")


def _basis(cfg: ExtractConfig, out: Path, head: dict, work: Work, codec, model, layers: list[int], payload: str,
           device, world: World) -> bytes:
    """The cache's fitted basis: the one an earlier run of this plan recorded, else fitted by rank 0 on `fit`
    views spread evenly over the records (rendered and captured exactly as the pipeline will)."""
    data = plans.recorded_index_file(out, head, BASIS)
    if data is None and world.is_main:
        count = min(codec.params["fit"], work.records)
        rows = sorted({r * work.records // count for r in range(count)})
        _log(cfg, f"fitting the {codec.name} basis on {len(rows)} views ...")
        with AttentionCapture(model, layers, payload) as capture:
            x = capture_rows(work, rows, capture, batch_size=cfg.batch_size, workers=cfg.workers, device=device,
                             amp=cfg.amp)
        data = basis_bytes(fit_basis(x, from_model(model, layers)))
    return world.broadcast(data)


def _extract_to_url(cfg: ExtractConfig, on_shard, stats) -> dict:
    import os
    from dataclasses import replace

    from .publish import Publisher, default_stage

    check_options(cfg)
    if cfg.num_shards > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise AttncacheError(f"--out {cfg.out}: a remote --out takes one extraction process; with torchrun or "
                             "--num-shards extract to a shared directory, then `attncache copy` it")
    stage = Path(cfg.stage) if cfg.stage else default_stage(cfg.out)
    check_paths(replace(cfg, out=str(stage)))  # before the remote is contacted: the local inputs first
    open_source(cfg.data, cfg.split, cfg.limit)
    publisher = Publisher(cfg.out, stage, cfg.storage_options)
    publisher.restore()
    _log(cfg, f"staging in {stage}, publishing each finished shard to {cfg.out}")

    def shard_done(index: int) -> None:
        publisher.shard_done(index)
        if on_shard is not None:
            on_shard(index)

    manifest = extract(replace(cfg, out=str(stage)), on_shard=shard_done, stats=stats, on_claim=publisher.claimed)
    publisher.finished(manifest)
    return manifest


def merge(out: str | Path) -> dict:
    """Write the manifest of a cache whose shards were written by independent jobs (`--num-shards`), once every
    shard is durable; a finished cache's manifest is returned as it is."""
    out = Path(out)
    run_dir = plans.cache_dir(out)
    with run_dir:
        if (out / MANIFEST).is_file() and not (out / PLAN).is_file():
            return read_json(out / MANIFEST)
        if not (out / PLAN).is_file():
            raise AttncacheError(f"{out}: no extraction in progress here (no {PLAN}); nothing to merge")
        run_dir.lock()
        return plans.finish(out)


class DrawnViews:
    """Every record's view in row order, drawn when asked for (a pure function of the policy and the samples):
    what the tables are written from, and the calibration views of a fitted basis."""

    def __init__(self, policy: ViewPolicy, samples: list[dict], spec):
        self.policy, self.samples, self.spec = policy, samples, spec

    def __len__(self) -> int:
        return len(self.samples) * self.policy.views_per_image

    def __getitem__(self, row: int) -> View:
        index, view = sample_and_view(row, len(self.samples))
        return self.policy.view(self.samples, index, view, self.spec.image_size, mean=self.spec.mean,
                                interpolation=self.spec.interpolation, depth=self.spec.depth)

    def __iter__(self):
        return (self[row] for row in range(len(self)))


def _log(cfg: ExtractConfig, msg: str) -> None:
    if cfg.progress:
        from rich.console import Console

        Console(stderr=True).print(f"attncache: {msg}", markup=False, highlight=False, emoji=False)

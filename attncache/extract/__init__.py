"""`attncache extract`: run a frozen teacher once over a dataset and write its attention maps to a cache.

Order of work, cheapest checks first: options (config.py), the paths (`--data` readable, `--out` writable, free or
ours), teacher, the source's listing (a finished cache of the same plan stops here: nothing to do), the free space
(`--out` must have room for the estimated cache), the scan (every image hashed and decoded, so a corrupt one is
named before the teacher runs), the claim of `--out` (plan.py), then the pipeline over the shards not yet complete
(pipeline.py), and the manifest, written last. The destination (publish.py) is made once from `--out` and hears
of each step where it happens: a local `--out` is the cache itself; a URL is a local staging directory, brought up
to the bucket's copy before the teacher is built and published to as it goes (the plan once claimed, each shard once
durable, the manifest last). A disk that fills up anyway stops it with one line (files.py): every write is whole or
absent, so the same command resumes once there is room.

Many processes: under torchrun every rank runs `extract()`; rank 0 scans, claims and writes the plan, index files and
store metadata, then each rank writes the whole shards s with s mod world = rank, and rank 0 writes the manifest
after a barrier. Independent jobs (`--num-shards S --shard-index i`, a SLURM array) each take the shards s with
s mod S = i (and split them over their own ranks); the last one to finish writes the manifest, or `merge()` does.
Shards, batches and bytes do not depend on how the work was split.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from ..codecs import CaptureShape, Codec, SideFileInputs
from ..device import parse_device
from ..distributed import World
from ..errors import AttncacheError, DiskFullError
from ..files import atomic_write_bytes, disk_full_names, free_bytes, read_json
from ..rundir import FINISHED
from ..sources import open_source
from ..store import WRITERS
from ..store.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    PLAN,
    dataset_fingerprint,
)
from ..store.records import Layout, write_tables
from ..teacher import AttentionCapture, parse_layers
from ..views import ViewPolicy
from . import plan as plans
from .config import ExtractConfig, check_options, check_paths
from .pipeline import Work, capture_rows, run_pipeline
from .publish import Destination, destination
from .views import DrawnViews

__all__ = ["DrawnViews", "ExtractConfig", "extract", "merge"]

# The free-space check refuses only when the room is clearly too small: under half the estimate (a cache's maps may
# compress better than the teacher the ratios were measured on, e.g. 0.66 of the estimate on a random-init teacher).
FREE_SPACE_MARGIN = 0.5


def extract(cfg: ExtractConfig, on_shard: Callable[[int], None] | None = None, stats: dict | None = None) -> dict:
    """Run, resume or repair an extraction; returns the manifest (None for a part of several jobs that leaves the
    manifest to the others).

    `on_shard(i)` is called after shard i is durable (and published); `stats`, if given, receives the pipeline's
    wall time and the number of records it processed (for benchmarks and tests). An `--out` URL (s3://...) is
    extracted into a local staging directory and published as it goes (publish.py): the destination is made once
    from `out` and every step below writes through it.

    With 50,000 records or more and `workers` >= 2 the views are drawn by a pool of processes (views.py): a script
    that calls this function must guard its entry point with `if __name__ == "__main__":`, as any multiprocessing
    code must (and as `train()` with `workers` already needs).
    """
    codec = check_options(cfg)
    dest = destination(cfg)  # local: `out` itself; a URL: one process, a staging directory published as it goes
    out = dest.dir
    check_paths(replace(cfg, out=str(out)))  # the local inputs first, before the remote is contacted
    plans.check_out_is_free(out)
    source = open_source(cfg.data, cfg.split, cfg.limit)  # cheap (nothing listed yet); names a missing --data
    if cfg.augment.mixes and source.streamed:
        raise AttncacheError(f"`data` {cfg.data}: mixing reads each view's partner image by key, which a streamed "
                             "(pipe:) source cannot do; use local or HTTP(S) shards")
    if stats is not None:
        stats.update(pipeline_s=0.0, records=0)
    with disk_full_names(out):  # ENOSPC from a write files.py does not make is one line too
        dest.restore()  # a URL: its plan and durable shards into the staging directory (resume from the bucket)
        if dest.url is not None:
            _log(cfg, f"staging in {out}, publishing each finished shard to {dest.url}")
        device = parse_device(cfg.device)
        world = World.from_env(device)  # torchrun: every rank runs this function, each on its own shards
        device = world.device(device)
        model, spec = cfg.teacher.build(device)
        entries = source.entries()
        job = _Job.of(cfg, codec, spec, source, len(entries))
        if not cfg.repair and (done := plans.finished_unchanged(out, job.head, job.dataset_head,
                                                                [e.key for e in entries])) is not None:
            _log(cfg, f"{out}: finished cache of this plan, nothing to do (`attncache verify` re-hashes it)")
            dest.finished(done)  # a URL: whatever of it has not reached the bucket yet
            return done
        if world.is_main and not cfg.ignore_free_space:
            check_free_space(out, codec, job.shape, job.records)

        # One rank hashes and decodes every image and writes the record tables; the others read them from the disk
        # once the plan is claimed (the cache's own files, not a copy of every sample in every rank's memory).
        samples = _scan(cfg, source, entries, out) if world.is_main else None
        drawn = DrawnViews(job.policy, samples, spec) if world.is_main else None

        # what the codec needs besides the records, built before any shard is coded (encoding may need it); a
        # calibration is captured on rank 0, which draws the views
        calibration = partial(_calibration, cfg, Work(out, spec, source, samples, drawn, job.per_shard, job.records,
                                                      cfg.embed_images), model, job.layers, job.payload, device)
        inputs = SideFileInputs(model, job.layers, calibration)
        index_files = _side_files(codec, inputs, job.shape, out, job.head, world)
        plan = _plan(job, samples, index_files) if world.is_main else None
        part = cfg.num_shards > 1  # one of several independent jobs (a SLURM array): claim, write, leave the rest
        with plans.run_dir(out) as run_dir:
            writer, error = None, None
            if world.is_main:
                try:
                    _claim(run_dir, plan, part, out)
                    dest.claimed()  # a URL: the plan goes up, so the bucket holds a resumable extraction from here on
                    plans.save_scan(out, samples, entries)
                    for name, data in index_files.items():
                        atomic_write_bytes(out / name, data)
                    _write_tables(cfg, out, plan, samples, drawn, job.records)
                    writer = _open_writer(cfg, codec, job, out)  # the store's metadata
                except AttncacheError as exc:
                    error = str(exc)
                if part:
                    run_dir.release()  # the other parts write their own shards meanwhile
            # the plan, index files and store metadata exist before any rank writes a shard (or every rank stops)
            error = world.broadcast(error)
            if error is not None:
                raise AttncacheError(error)
            if writer is None:
                writer = _open_writer(cfg, codec, job, out)
            del samples, drawn, entries, calibration, inputs  # from here on every rank reads the tables
            who = f"part {cfg.shard_index + 1}/{cfg.num_shards}, " if part else ""
            who += f"rank {world.rank}/{world.size}: " if world.distributed else ""
            _write_shards(cfg, codec, job, spec, source, model, device, world, writer, dest, who, on_shard, stats)
            world.barrier()
            manifest = _write_manifest(cfg, out, run_dir, world, part, who)
    dest.finished(manifest)  # a URL: the store metadata and index files, then the manifest, last
    return manifest


@dataclass
class _Job:
    """What the plan fixes before any image is read: the capture, the views, the records and their shards."""

    layers: list[int]
    payload: str
    policy: ViewPolicy
    shape: CaptureShape
    fields: dict
    records: int
    per_shard: int
    head: dict  # the plan's sections that need no image (teacher, capture, codec, views, store)
    dataset_head: dict  # its dataset section without the content fingerprint

    @classmethod
    def of(cls, cfg: ExtractConfig, codec: Codec, spec, source, images: int) -> _Job:
        layers = parse_layers(cfg.layers, spec.depth)
        payload = cfg.payload or codec.payloads[0]
        policy = ViewPolicy(split=cfg.split, views_per_image=cfg.views, seed=cfg.seed,
                            crop_pct=spec.crop_pct if cfg.split == "val" else 0.875, augment=cfg.augment)
        shape = spec.capture_shape(len(layers))
        fields = codec.fields(shape)
        records = images * policy.views_per_image
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
        dataset_head = {"num_samples": images, "classes": source.classes, "source": source.description}
        return cls(layers, payload, policy, shape, fields, records, per_shard, head, dataset_head)


def _scan(cfg: ExtractConfig, source, entries: list, out: Path):
    """Hash and decode every image (a corrupt one is named before the teacher runs); what it hashes is logged as it
    goes, so a killed scan resumes where it stopped. Returns the samples table's rows (~54 bytes and the key per
    image), not a Python object per image."""
    _log(cfg, f"scanning {source.description} ({len(entries)} images) ...")
    return source.scan_rows(cfg.workers, plans.load_scan(out), on_progress=plans.scan_logger(out),
                            every=plans.SCAN_LOG_EVERY)


def _plan(job: _Job, samples, index_files: dict[str, bytes]) -> dict:
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,  # per-chunk checksums, a sealed manifest and record tables
        **job.head,
        "dataset": {**job.dataset_head, "fingerprint": dataset_fingerprint(samples)},
        "files": {name: plans.index_file_entry(name, data) for name, data in index_files.items()},
    }


def _claim(run_dir, plan: dict, part: bool, out: Path) -> None:
    """Lock `out` and record the plan (an earlier, unstarted plan's files are discarded, rundir.py)."""
    state = run_dir.claim(plan, shared=part)
    if state == FINISHED:  # same plan, but a file is damaged or --repair asked for a full check
        plans.reopen_finished(out)


def _write_tables(cfg: ExtractConfig, out: Path, plan: dict, samples, drawn: DrawnViews, records: int) -> None:
    if not plans.tables_done(out, cfg.repair):
        _log(cfg, f"writing the record tables ({records} views) ...")
        layout = Layout.of(plan)
        plans.write_tables_marker(out, write_tables(out, samples, drawn.table_rows(layout, cfg.workers), layout))


def _open_writer(cfg: ExtractConfig, codec: Codec, job: _Job, out: Path):
    return WRITERS[cfg.format](out, job.fields, codec.compressor(), job.records, job.per_shard, cfg.embed_images)


def _write_shards(cfg: ExtractConfig, codec: Codec, job: _Job, spec, source, model, device, world: World, writer,
                  dest: Destination, who: str, on_shard, stats) -> None:
    """This process's shards not yet complete, each published by `dest` once durable; samples and views are read
    from the record tables."""
    out = dest.dir
    tables = plans.open_tables(out)
    work = Work(out, spec, source, tables.samples_seq(), tables.views_seq(), job.per_shard, job.records,
                cfg.embed_images)
    shards = plans.num_shards(job.records, job.per_shard)
    mine = plans.shards_of(shards, cfg.num_shards * world.size, cfg.shard_index * world.size + world.rank)
    pending = [s for s in mine if not plans.shard_done(out, s, writer.shard_paths(s), cfg.repair)]
    _log(cfg, f"{who}{len(mine)} of {shards} shards ({job.records} records in all), {len(mine) - len(pending)} "
              "already complete")
    start = time.perf_counter()
    if pending:
        with AttentionCapture(model, job.layers, job.payload) as capture:
            run_pipeline(work, pending, capture, codec, writer, batch_size=cfg.batch_size, workers=cfg.workers,
                         device=device, amp=cfg.amp, progress=cfg.progress, on_shard=on_shard, destination=dest)
    done = sum(min(job.per_shard, job.records - s * job.per_shard) for s in pending)
    seconds = time.perf_counter() - start
    if stats is not None:
        stats.update(pipeline_s=seconds, records=done)
    if world.distributed:  # throughput per rank and in total, said once by rank 0
        per_rank = world.gather((done, seconds))
        total = sum(r for r, _ in per_rank) / max(1e-9, max(t for _, t in per_rank))
        if world.is_main:
            _log(cfg, f"{sum(r for r, _ in per_rank)} records: {total:.1f} views/s in total; per rank "
                      + ", ".join(f"{r / max(1e-9, t):.1f}" for r, t in per_rank))


def _write_manifest(cfg: ExtractConfig, out: Path, run_dir, world: World, part: bool, who: str) -> dict | None:
    """Rank 0 writes the manifest, last, once every shard is durable; every rank returns it."""
    manifest = None
    if world.is_main:
        if part:  # the part that finishes last writes the manifest; the others leave it to it (or to merge)
            run_dir.lock()
            manifest = plans.finish(out, required=False)
            if manifest is None:
                _log(cfg, f"{who}done; the cache is complete once every part is (`attncache merge {out}`)")
        else:
            manifest = plans.finish(out)
    return world.broadcast(manifest)


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
    side = costs.side_file_bytes(codec, shape)
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
                            "another `out` (`stage` for a remote one), or pass `ignore_free_space` to start anyway "
                            "(a full disk stops it cleanly, and it resumes)")


def _side_files(codec: Codec, inputs: SideFileInputs, shape: CaptureShape, out: Path, head: dict,
                world: World) -> dict[str, bytes]:
    """The bytes of every side file the codec carries, bound to it. One fitted to the data is fitted once, by rank
    0, or taken as an earlier run of this plan recorded it; the others are functions of the teacher alone, which
    every rank holds: the same bytes everywhere, with nothing to send."""
    files = {}
    for side in codec.side_files:
        if side.fitted:
            data = plans.recorded_index_file(out, head, side.name)
            if data is None and world.is_main:
                data = side.build(codec, inputs)
            files[side.name] = world.broadcast(data)
        else:
            files[side.name] = side.build(codec, inputs)
    codec.bind(files, shape)
    return files


def _calibration(cfg: ExtractConfig, work: Work, model, layers: list[int], payload: str, device, count: int):
    """The capture of `count` views spread evenly over the records, rendered and captured exactly as the pipeline
    will (`SideFileInputs.calibration`)."""
    count = min(count, work.records)
    rows = sorted({r * work.records // count for r in range(count)})
    _log(cfg, f"capturing {len(rows)} calibration views for the {cfg.codec} codec ...")
    with AttentionCapture(model, layers, payload) as capture:
        return capture_rows(work, rows, capture, batch_size=cfg.batch_size, workers=cfg.workers, device=device,
                            amp=cfg.amp)


def merge(out: str | Path) -> dict:
    """Write the manifest of a cache whose shards were written by independent jobs (`--num-shards`), once every
    shard is durable; a finished cache's manifest is returned as it is."""
    out = Path(out)
    run_dir = plans.run_dir(out)
    with run_dir:
        if (out / MANIFEST).is_file() and not (out / PLAN).is_file():
            return read_json(out / MANIFEST)
        if not (out / PLAN).is_file():
            raise AttncacheError(f"{out}: no extraction in progress here (no {PLAN}); nothing to merge")
        run_dir.lock()
        return plans.finish(out)


def _log(cfg: ExtractConfig, msg: str) -> None:
    if cfg.progress:
        from rich.console import Console

        Console(stderr=True).print(f"attncache: {msg}", markup=False, highlight=False, emoji=False)

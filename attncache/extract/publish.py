"""Where an extraction's files go: `destination(cfg)` is made once from `out`, and `extract()` writes through it.

A local `out` is written in place (`Destination`: every hook does nothing). An `out` URL (`--out s3://bucket/prefix`)
is a `Bucket`: the extraction runs in a local staging directory and the bucket is published to as it goes, the way
mosaic streaming's writer owns its `CloudUploader` (each shard uploaded as it is flushed, the index last), so that the
remote copy is always a resumable extraction or a finished cache. `extract()` calls each hook once, where its event
happens: `restore()` before the teacher is built, `claimed()` once the plan is written, `shard_durable(i)` (from the
writer thread, pipeline.py) once shard i and its marker are on the disk, `finished(manifest)` at the end.

Order of uploads (each object is visible whole or not at all): the plan (`.progress/plan.json`) once the cache is
claimed; each shard's files as soon as the shard is durable, then its marker (`.progress/shard-NNNNNN.json`); at
the end the store metadata and index files, then `manifest.json` last, then the remote `.progress/` is removed. A
reader therefore never sees a manifest whose files are not all there.

Resume works against the remote copy: a re-run (on this machine or another, with an empty staging directory)
first downloads the remote plan, markers and the shards they name, checking each file against its marker's sha256,
so no shard that reached the remote store is computed twice.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AttncacheError
from ..files import atomic_write_bytes, loads_strict, read_json
from ..store.format import MANIFEST, PLAN, PROGRESS_DIR, named_files, shard_paths
from ..store.fs import CacheFS, is_url
from . import plan as plans

if TYPE_CHECKING:
    from .config import ExtractConfig


def default_stage(url: str) -> Path:
    base = os.environ.get("ATTNCACHE_STAGE_DIR") or Path.home() / ".cache" / "attncache" / "stage"
    return Path(base) / hashlib.sha256(url.encode()).hexdigest()[:16]


def destination(cfg: ExtractConfig) -> Destination:
    """The destination of `cfg.out`; nothing is contacted yet (the local inputs are checked first). A remote `out`
    takes one extraction process: its staging directory and uploads are this process's alone."""
    if not is_url(cfg.out):
        return Destination(Path(cfg.out))
    if cfg.num_shards > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise AttncacheError(f"`out` {cfg.out}: a remote `out` takes one extraction process; with torchrun or "
                             "`num_shards` extract to a shared directory, then `attncache copy` it")
    return Bucket(cfg.out, Path(cfg.stage) if cfg.stage else default_stage(cfg.out), cfg.storage_options)


class Destination:
    """A local `out`: the extraction's directory is the cache itself, so there is nothing to publish."""

    url: str | None = None  # where the cache is published, if anywhere but `dir`

    def __init__(self, directory: Path):
        self.dir = Path(directory)  # the local directory the extraction writes

    def restore(self) -> None:
        """Bring `dir` up to what the destination already holds (before the teacher is built)."""

    def claimed(self) -> None:
        """The plan is written in `dir` (the cache is claimed)."""

    def shard_durable(self, index: int) -> None:
        """Shard `index`'s files and its marker are durable in `dir`."""

    def finished(self, manifest: dict | None) -> None:
        """The manifest is written in `dir` (None: a part of several that leaves it to the others)."""


class Bucket(Destination):
    """An `out` URL: extracted in the staging directory `dir`, published to `url` as it goes."""

    def __init__(self, url: str, stage: Path, storage_options: dict | None = None):
        super().__init__(stage)
        self.url, self.storage_options = url, storage_options
        self._remote: CacheFS | None = None

    @property
    def remote(self) -> CacheFS:  # opened when first contacted: a missing backend is named after the local inputs
        if self._remote is None:
            self._remote = CacheFS(self.url, self.storage_options)
        return self._remote

    def restore(self) -> None:
        """Bring the staging directory up to what the remote copy holds (plan, durable shards)."""
        if self.remote.exists(MANIFEST) and not self.remote.exists(PLAN):
            if not (self.dir / MANIFEST).is_file():
                raise AttncacheError(f"`out` {self.url}: already holds a finished cache (check it with `attncache "
                                     "verify`; to extract again, remove it or choose another prefix)")
            return
        if not self.remote.exists(PLAN):
            return
        plan = self.remote.read(PLAN, 64 << 20)
        local_plan = self.dir / PLAN
        if local_plan.is_file() and local_plan.read_bytes() != plan:
            raise AttncacheError(f"`stage` {self.dir}: holds another extraction's plan than {self.url}; "
                                 "remove the staging directory or choose another `stage`")
        try:
            parsed = loads_strict(plan)
            store, fields = parsed["store"], parsed["codec"]["fields"]
        except (ValueError, KeyError, TypeError) as exc:
            raise AttncacheError(f"`out` {self.url}: its {PLAN} is not an attncache plan ({exc})") from exc
        atomic_write_bytes(local_plan, plan)
        for rel in self.remote_markers():
            index = int(rel.rsplit("-", 1)[1].split(".")[0])
            files = loads_strict(self.remote.read(rel, 1 << 20))["files"]
            paths = shard_paths(store["format"], fields, index)
            if sorted(f["path"] for f in files) != sorted(paths):  # only the names the format gives: no escapes
                continue  # recomputed
            if not plans.shard_done(self.dir, index, paths):
                self._download_shard(index, files)

    def remote_markers(self) -> list[str]:
        found = self.remote.call(PROGRESS_DIR, lambda: self.remote.fs.glob(
            self.remote.path(f"{PROGRESS_DIR}/shard-*.json")))
        prefix = self.remote.root.rstrip("/") + "/"
        return sorted(p[len(prefix):] for p in found)

    def _download_shard(self, index: int, files: list[dict]) -> None:
        for f in files:
            data = self.remote.read(f["path"], f["bytes"])
            if len(data) != f["bytes"] or hashlib.sha256(data).hexdigest() != f["sha256"]:
                return  # a damaged remote shard is recomputed, not trusted
            atomic_write_bytes(self.dir / f["path"], data)
        plans.write_marker(self.dir, index, [f["path"] for f in files])  # mtimes of the local copies

    def claimed(self) -> None:
        self.remote.put(PLAN, self.dir / PLAN)

    def shard_durable(self, index: int) -> None:
        marker = plans.marker_path(self.dir, index)
        for f in read_json(marker)["files"]:
            self.remote.put(f["path"], self.dir / f["path"])
        self.remote.put(os.path.relpath(marker, self.dir), marker)  # after its files: a marker means durable

    def finished(self, manifest: dict | None) -> None:
        shard_files = {f["path"] for s in manifest["store"]["shards"] for f in s["files"]}
        for f in named_files(manifest):  # shards went up as they finished; a killed upload is redone here
            if f["path"] not in shard_files or not self._remote_size_ok(f):
                self.remote.put(f["path"], self.dir / f["path"])
        self.remote.put(MANIFEST, self.dir / MANIFEST)  # last: the cache is complete from here on
        self.remote.remove(PROGRESS_DIR)

    def _remote_size_ok(self, entry: dict) -> bool:
        try:
            return self.remote.size(entry["path"]) == entry["bytes"]
        except AttncacheError:
            return False

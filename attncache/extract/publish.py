"""`attncache extract --out s3://bucket/prefix`: extract into a local staging directory and publish to the remote
location as it goes, so that the remote copy is always a resumable extraction or a finished cache.

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

from ..errors import AttncacheError
from ..files import atomic_write_bytes, loads_strict, read_json
from ..store.format import MANIFEST, PLAN, PROGRESS_DIR, named_files, shard_paths
from ..store.fs import CacheFS
from . import plan as plans


def default_stage(url: str) -> Path:
    base = os.environ.get("ATTNCACHE_STAGE_DIR") or Path.home() / ".cache" / "attncache" / "stage"
    return Path(base) / hashlib.sha256(url.encode()).hexdigest()[:16]


class Publisher:
    """The remote side of an extraction whose `--out` is a URL."""

    def __init__(self, url: str, stage: Path, storage_options: dict | None = None):
        self.url, self.stage = url, Path(stage)
        self.remote = CacheFS(url, storage_options)

    def restore(self) -> None:
        """Bring the staging directory up to what the remote copy holds (plan, durable shards)."""
        if self.remote.exists(MANIFEST) and not self.remote.exists(PLAN):
            if not (self.stage / MANIFEST).is_file():
                raise AttncacheError(f"--out {self.url}: already holds a finished cache (check it with `attncache "
                                     "verify`; to extract again, remove it or choose another prefix)")
            return
        if not self.remote.exists(PLAN):
            return
        plan = self.remote.read(PLAN, 64 << 20)
        local_plan = self.stage / PLAN
        if local_plan.is_file() and local_plan.read_bytes() != plan:
            raise AttncacheError(f"--stage {self.stage}: holds another extraction's plan than {self.url}; "
                                 "remove the staging directory or choose another --stage")
        try:
            parsed = loads_strict(plan)
            store, fields = parsed["store"], parsed["codec"]["fields"]
        except (ValueError, KeyError, TypeError) as exc:
            raise AttncacheError(f"--out {self.url}: its {PLAN} is not an attncache plan ({exc})") from exc
        atomic_write_bytes(local_plan, plan)
        for rel in self.remote_markers():
            index = int(rel.rsplit("-", 1)[1].split(".")[0])
            files = loads_strict(self.remote.read(rel, 1 << 20))["files"]
            paths = shard_paths(store["format"], fields, index)
            if sorted(f["path"] for f in files) != sorted(paths):  # only the names the format gives: no escapes
                continue  # recomputed
            if not plans.shard_done(self.stage, index, paths):
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
            atomic_write_bytes(self.stage / f["path"], data)
        plans.write_marker(self.stage, index, [f["path"] for f in files])  # mtimes of the local copies

    def claimed(self) -> None:
        self.remote.put(PLAN, self.stage / PLAN)

    def shard_done(self, index: int) -> None:
        marker = plans.marker_path(self.stage, index)
        for f in read_json(marker)["files"]:
            self.remote.put(f["path"], self.stage / f["path"])
        self.remote.put(os.path.relpath(marker, self.stage), marker)  # after its files: a marker means durable

    def finished(self, manifest: dict) -> None:
        shard_files = {f["path"] for s in manifest["store"]["shards"] for f in s["files"]}
        for f in named_files(manifest):  # shards went up as they finished; a killed upload is redone here
            if f["path"] not in shard_files or not self._remote_size_ok(f):
                self.remote.put(f["path"], self.stage / f["path"])
        self.remote.put(MANIFEST, self.stage / MANIFEST)  # last: the cache is complete from here on
        self.remote.remove(PROGRESS_DIR)

    def _remote_size_ok(self, entry: dict) -> bool:
        try:
            return self.remote.size(entry["path"]) == entry["bytes"]
        except AttncacheError:
            return False


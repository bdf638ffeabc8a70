"""The run-directory routine shared by extraction (a cache) and training (a run): claim, resume, finish.

A directory an attncache command writes to is described by two files: the *plan* (what the command will compute:
`.progress/plan.json` of a cache, `config.json` of a run) and the *done* file (`manifest.json`, `results.json`).

- `check(plan)`, before any expensive work and without writing anything: a missing or empty directory is new; a
  directory holding something else is refused (nothing a user wrote is ever touched); ours with the same plan is
  resumed or finished; ours with another plan is refused, unless that run never got started (nothing of value in
  it), which is re-claimed, so a failed first attempt never blocks the corrected command.
- `claim(plan)`: takes the directory's lock (one writer at a time: a second process gets a clear error instead of
  interleaved shards), discards an unstarted run, writes the plan, and removes temporary files a killed write
  left behind.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path

from .errors import ConfigError
from .files import StrictJSONError, atomic_write_json, read_json, remove_partials

NEW, RESUME, FINISHED, RECLAIM = "new", "resume", "finished", "reclaim"


class RunDir:
    def __init__(self, path: str | Path, *, kind: str, plan_file: str, done_file: str,
                 started: Callable[[Path, dict], bool],
                 recorded_plan: Callable[[Path], dict] | None = None,
                 differences: Callable[[dict, dict], list[str]],
                 discard: Callable[[Path, dict], None] | None = None, unclaimed: tuple[str, ...] = ()):
        """`started(path, old_plan)`: has the run produced anything of value? `differences(old, new)`: the parts
        of the plan that differ (what a refusal names; each kind of run compares its own). `recorded_plan(path)`:
        the plan on disk (default: the plan file). `discard(path, old_plan)`: remove an unstarted run's files.
        `unclaimed`: files (`folder/name`) a run writes before it claims the directory: a directory holding only
        those is free."""
        self.path, self.kind = Path(path), kind
        self.plan_file, self.done_file = plan_file, done_file
        self._started, self._differences, self._discard = started, differences, discard
        self._recorded_plan = recorded_plan or (lambda p: read_json(p / plan_file))
        self._lock_fd: int | None = None
        self.unclaimed = unclaimed

    def is_free(self) -> bool:
        """Missing, empty, or holding only `unclaimed` files (looked up by name: a big foreign folder is never
        walked)."""
        if not self.path.exists():
            return True
        allowed = {tuple(name.split("/")) for name in self.unclaimed}
        for entry in self.path.iterdir():
            if entry.is_symlink() or not any(a[0] == entry.name for a in allowed):
                return False
            if entry.is_dir() and any(not (p.is_file() and (entry.name, p.name) in allowed) for p in entry.iterdir()):
                return False
            if entry.is_file() and (entry.name,) not in allowed:
                return False
        return True

    def is_ours(self) -> bool:
        return (self.path / self.plan_file).is_file() or (self.path / self.done_file).is_file()

    def check(self, plan: dict) -> str:
        """NEW, RESUME, FINISHED or RECLAIM; raises ConfigError for a directory that is not ours to write."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise ConfigError(f"`out` {out}: exists and is not a directory")
        if self.is_free():
            return NEW
        if not self.is_ours():
            raise ConfigError(f"`out` {out}: not empty and holds no attncache {self.kind}; "
                              "choose an empty or new directory")
        try:
            old = self._recorded_plan(out)
        except (OSError, StrictJSONError, KeyError, TypeError) as exc:
            raise ConfigError(f"`out` {out}: its {self.kind} plan is unreadable ({exc}); "
                              "choose another `out`") from exc
        differ = self._differences(old, plan)
        if differ:
            if not self._started(out, old):
                return RECLAIM
            verb = "differs" if len(differ) == 1 else "differ"
            raise ConfigError(f"`out` {out}: holds a different {self.kind} ({', '.join(differ)} {verb}); "
                              "choose another `out`")
        return FINISHED if (out / self.done_file).is_file() else RESUME

    def claim(self, plan: dict, shared: bool = False) -> str:
        """Lock the directory and record `plan`; returns the state check() gives.

        `shared`: one of several processes that write distinct parts of the same plan (independent extraction
        jobs): wait for the lock instead of refusing, and leave temporary files alone (another part may be
        writing them); the caller releases the lock once its setup is written."""
        state = self.check(plan)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock(blocking=shared)
        if shared:
            state = self.check(plan)  # again under the lock: another part may have claimed it meanwhile
        if state == RECLAIM:
            if self._discard is not None:
                self._discard(self.path, self._recorded_plan(self.path))
            state = NEW
        if not shared:
            remove_partials(self.path)
        atomic_write_json(self.path / self.plan_file, plan)  # also when finished: a repair must stay resumable
        return state

    def _lock(self, blocking: bool = False) -> None:
        if self._lock_fd is not None:
            return
        fd = os.open(self.path, os.O_RDONLY)  # a lock on the directory itself: no lock file in the result
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise ConfigError(f"`out` {self.path}: another attncache process is writing to it") from exc
        self._lock_fd = fd

    def lock(self) -> None:
        """Wait for the directory's lock (held until `release()`)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock(blocking=True)

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the lock
            self._lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

"""Local files this tool writes or parses: atomic writes that honour the umask, strict JSON, append-only logs.

- `atomic_write_bytes`: a temporary name in the same folder, fsync, rename. Readers (and a re-run after SIGKILL)
  see the old file or the new one, never half of one. The result gets the mode any file the user creates gets
  (0666 minus the umask): a cache is meant to be shared.
- `loads_strict`: JSON that refuses duplicate keys, NaN and Infinity (a cache is untrusted input; `{"a": 1, "a":
  2}` must not silently mean 2), and nesting deeper than `MAX_JSON_DEPTH` (a RecursionError is no error message).
- `canonical_safetensors`: a safetensors file with its JSON header's keys sorted, so the same tensors are the
  same bytes (and sha256) in every process.
- `AppendLog`: one JSON object per line, appended; a torn last line (a kill during the write) is dropped on open,
  never the lines before it.
- A full filesystem (ENOSPC, or the user's quota, EDQUOT) is a `DiskFullError` naming the file and the bytes it
  needed; `free_bytes` is what a check before the work compares its estimate with.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np

from .errors import CacheFormatError, DiskFullError

PARTIAL_SUFFIX = ".partial"  # every temporary file ends so (ours and zarr's LocalStore's): never a format file
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # the filesystem is full, or the user's quota on it is
# Deeper than any file this tool writes (a manifest nests 6 levels), far below the ~1000 at which json (and
# everything that walks the parsed value: the schema check, dumps_canonical) runs out of stack.
MAX_JSON_DEPTH = 64

_umask: int | None = None
_umask_lock = threading.Lock()


def file_mode() -> int:
    """0666 minus the process umask, read once (os.umask can only be read by setting it)."""
    global _umask
    with _umask_lock:
        if _umask is None:
            _umask = os.umask(0o022)
            os.umask(_umask)
    return 0o666 & ~_umask


def free_bytes(path: str | Path) -> int:
    """Bytes this user may still write on the filesystem holding `path` (or where it would be created)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def disk_full(path: str | Path, needed: int | None) -> DiskFullError:
    """The one-line error of a write that found no room (nothing partial of it is left)."""
    try:
        free = f"{free_bytes(path):,}"
    except OSError:
        free = "unknown"
    what = f"needed {needed:,} bytes" if needed is not None else "a write failed"
    return DiskFullError(f"{path}: no space left on device ({what}, {free} bytes free there); free some space "
                         "and run the same command again: it resumes (nothing partial was kept)")


@contextlib.contextmanager
def disk_full_names(path: str | Path):
    """Turn ENOSPC/EDQUOT from writes made elsewhere (zarr's metadata, the record tables, the scan log) into a
    DiskFullError naming the file, else `path`: a full disk is one line, not a traceback, wherever it fills."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in NO_SPACE:
            raise
        raise disk_full(exc.filename or path, None) from exc


def atomic_write_bytes(path: str | Path, data) -> None:
    """Write `data` (bytes, or an iterable of byte chunks: written as they come, never joined) to `path`
    atomically, with the mode a newly created file would have. A full disk raises DiskFullError (the temporary
    file removed, `path` as it was)."""
    path = Path(path)
    try:
        _atomic_write(path, [data] if isinstance(data, (bytes, bytearray, memoryview)) else data)
    except OSError as exc:
        if exc.errno not in NO_SPACE:
            raise
        raise disk_full(path, len(data) if isinstance(data, (bytes, bytearray, memoryview)) else None) from exc


def _atomic_write(path: Path, chunks) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fchmod(f.fileno(), file_mode())  # mkstemp creates 0600
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dumps_canonical(obj) -> bytes:
    """Sorted keys, no spaces, NaN refused: the bytes that hashes and comparisons are taken over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def atomic_write_json(path: str | Path, obj, indent: int | None = 2) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=indent, allow_nan=False) + "\n").encode())


def write_jsonl(path: str | Path, rows) -> None:
    atomic_write_bytes(path, (dumps_canonical(r) + b"\n" for r in rows))


class StrictJSONError(ValueError):
    pass


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise StrictJSONError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constants(name):
    raise StrictJSONError(f"{name} is not a JSON number")


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string: brackets inside it do not nest
_NESTING = np.zeros(256, np.int8)
_NESTING[[ord("["), ord("{")]], _NESTING[[ord("]"), ord("}")]] = 1, -1


def json_depth(data: bytes) -> int:
    """How deeply arrays and objects nest in JSON text (0 for a scalar), counted without parsing it."""
    steps = _NESTING[np.frombuffer(_STRING.sub(b"", data), np.uint8)]
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0))


def _check_depth(data: bytes | str) -> None:
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:  # the common case (a metrics or scan line): no scan
        return
    if (depth := json_depth(raw)) > MAX_JSON_DEPTH:
        raise StrictJSONError(f"arrays or objects nested {depth} deep (at most {MAX_JSON_DEPTH})")


def loads_strict(data: bytes | str):
    """json.loads that raises StrictJSONError (a ValueError) on duplicate keys, NaN, Infinity, bad syntax or
    nesting deeper than MAX_JSON_DEPTH (checked first: json itself would raise RecursionError)."""
    _check_depth(data)
    try:
        return json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise StrictJSONError(f"invalid JSON ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise StrictJSONError(f"not UTF-8 text ({exc.reason})") from exc


def canonical_safetensors(data: bytes) -> bytes:
    """The same file with its JSON header's keys sorted. safetensors writes `__metadata__` from a hash map, whose
    order changes from process to process: the same tensors gave other bytes (another sha256) in a re-run, and a
    resumed extraction was refused as "a different cache". The data section and its offsets are unchanged."""
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(loads_strict(data[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors pads the header to 8 bytes with spaces
    return len(header).to_bytes(8, "little") + header + data[8 + size:]


def read_json(path: str | Path):
    """A JSON file this tool wrote (plan, config, marker), strictly parsed."""
    return loads_strict(Path(path).read_bytes())


class AppendLog:
    """A JSON-lines file that only grows, one `append` per line. Opening it drops a torn last line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lines = self._repair()

    def _repair(self) -> int:
        if not self.path.exists():
            return 0
        data = self.path.read_bytes()
        whole = data[:data.rfind(b"\n") + 1]  # a line without its newline was cut by a kill: drop it
        if len(whole) != len(data):
            atomic_write_bytes(self.path, whole)
        return whole.count(b"\n")

    def read(self) -> list[dict]:
        return [loads_strict(line) for line in self.path.read_bytes().splitlines()] if self.path.exists() else []

    def truncate(self, lines: int) -> None:
        """Keep the first `lines` lines (what a checkpoint had seen); later ones are about to be recomputed."""
        if lines < self.lines:
            data = self.path.read_bytes()
            keep = b"".join(line + b"\n" for line in data.splitlines()[:lines])
            atomic_write_bytes(self.path, keep)
            self.lines = lines

    def append(self, record: dict) -> None:
        # A diverged loss is worth recording, but NaN is not JSON: non-finite numbers are written as null.
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        line = json.dumps(clean, allow_nan=False).encode() + b"\n"
        size = self.path.stat().st_size if self.path.exists() else 0
        try:
            with open(self.path, "ab") as f:  # created with 0666 minus the umask, like any file
                f.write(line)
        except OSError as exc:
            if exc.errno not in NO_SPACE:
                raise
            os.truncate(self.path, size)  # no torn line left behind (truncating needs no room)
            raise disk_full(self.path, len(line)) from exc
        self.lines += 1

    def sync(self) -> None:
        """Make the lines written so far durable (before a checkpoint records how many there are)."""
        if self.path.exists():
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def remove_partials(root: str | Path) -> list[Path]:
    """Remove temporary files left under `root` by a killed write (names ending in `.partial`); returns them."""
    removed = []
    for path in Path(root).rglob(f"*{PARTIAL_SUFFIX}"):
        if path.is_file() and not path.is_symlink():
            path.unlink()
            removed.append(path)
    return removed


def stream_verified(src, out, entry: dict, where: str, block: int, remote: bool) -> None:
    """Copy the file object `src` into `out` a block at a time, reading at most the manifest's size + 1 bytes, and
    check size and sha256 against the manifest `entry`. A remote file cut short raises ConnectionError (the caller
    retries it like a reset); anything else that differs is a CacheFormatError naming `where`."""
    h, n = hashlib.sha256(), 0
    while data := src.read(min(block, entry["bytes"] + 1 - n)):
        h.update(data)
        out.write(data)
        n += len(data)
        if n > entry["bytes"]:
            break
    if n < entry["bytes"] and remote:
        raise ConnectionError(f"download truncated ({n} of {entry['bytes']} bytes)")
    if n != entry["bytes"] or h.hexdigest() != entry["sha256"]:
        raise CacheFormatError(f"{where}: does not match the size and sha256 in the manifest (damaged, or "
                               "changed since it was published); nothing of it was kept")


class FileLock:
    """An exclusive flock on `path` (created if missing) for the block: the processes of a node take turns.
    `best_effort`: where the lock file cannot be made (a read-only folder), go on unlocked instead of failing."""

    def __init__(self, path: str | Path, best_effort: bool = False):
        self.path, self.best_effort, self.fd = Path(path), best_effort, None

    def __enter__(self):
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
            if not self.best_effort:
                raise
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None

"""A webdataset shard's members (name, data offset, size) from its tar headers, fast, and kept once per node.

ImageNet as webdataset is ~1,300 tars of 2.6M members. Python's `tarfile` builds a TarInfo per member (~100-700 us
each here), so listing them took minutes in every process that opened the source: the trainer of each rank, every
run. `walk` reads only the 512-byte headers (one pread each; the data is skipped by offset, as tarfile does) and
parses the few fields an index needs: ustar, GNU (`L` long names) and pax (`x`/`g` path and size records) headers,
checksums checked. Anything else unusual in a header (sparse members, a base-256 size in a pax world, ...) raises
`Unsupported` and the caller falls back to `tarfile`.

`NodeMemo` keeps each shard's listing on the node (in the same per-user folder as remote caches' tables), keyed by
the shard's path, size and modification time, so the ranks of a node and later runs map it instead of walking the
tar again; ranks start at different shards (by pid), so a first listing is shared out among them.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from ..files import FileLock

BLOCK = 512
REGULAR = (b"0", b"\0", b"7")
SKIPPED = (b"1", b"2", b"3", b"4", b"5", b"6", b"K")  # links, devices, directories, fifos, GNU long link names
MAX_NAME_BYTES = 1 << 16  # a long-name or pax header larger than this is not a webdataset shard
_HIGH = bytes(range(128, 256))
LISTING = ("offset", "size", "label", "key_bytes", "keys", "hash")  # a shard's arrays (webdataset._listing)


class Unsupported(Exception):
    """A header `walk` does not parse (the caller lists the shard with tarfile instead)."""


class Damaged(ValueError):
    """A header that no tar reader would accept (a bad checksum, a size past the end of the file)."""


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 (members over 8 GiB): never in a webdataset shard
        raise Unsupported("base-256 number")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise Damaged(f"invalid number field {field!r}") from None


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _checksum_ok(header: bytes) -> bool:
    stored = _number(header[148:156])
    blanked = header[:148] + b" " * 8 + header[156:]
    unsigned = sum(blanked)
    if stored == unsigned:
        return True
    return stored == unsigned - 256 * (len(blanked) - len(blanked.translate(None, _HIGH)))  # old signed sums


def _pax_records(data: bytes) -> dict[str, str]:
    """A pax extended header's `length key=value\\n` records."""
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] not in (b"\0", b""):
        space = data.find(b" ", pos)
        if space < 0:
            raise Damaged("pax record without a length")
        length = int(data[pos:space])
        record = data[space + 1:pos + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise Damaged("invalid pax record")
        key, value = record[:-1].split(b"=", 1)
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def walk(read_at, file_size: int):
    """(name, data offset, size) of each regular member, in order; `read_at(offset, n)` reads the tar's bytes.
    Follows tarfile's reading: it ends at the first all-zero block or at the end of the file."""
    pos, long_name, pax, global_pax = 0, None, {}, {}
    while pos + BLOCK <= file_size:
        header = read_at(pos, BLOCK)
        if len(header) < BLOCK or header == bytes(BLOCK):
            return
        if not _checksum_ok(header):
            raise Damaged(f"bad header checksum at byte {pos}")
        kind, size = header[156:157], _number(header[124:136])
        data, pos = pos + BLOCK, pos + BLOCK + -(-size // BLOCK) * BLOCK
        if data + size > file_size:
            raise Damaged(f"member at byte {data - BLOCK} runs past the end of the file")
        if kind in (b"L", b"x", b"g"):
            if size > MAX_NAME_BYTES:
                raise Damaged(f"extended header of {size} bytes at byte {data - BLOCK}")
            body = read_at(data, size)
            if kind == b"L":
                long_name = _text(body)
            else:
                (pax if kind == b"x" else global_pax).update(_pax_records(body))
            continue
        fields = {**global_pax, **pax}
        if kind not in REGULAR + SKIPPED or any(k.startswith("GNU.sparse") for k in fields):
            raise Unsupported(f"member type {kind!r}")
        name = _text(header[:100])
        prefix = _text(header[345:500]) if header[257:263] == b"ustar\0" else ""
        if prefix:
            name = f"{prefix}/{name}"
        name = fields.get("path", long_name or name)
        if "size" in fields:
            raise Unsupported("pax size record")
        long_name, pax = None, {}
        if kind in REGULAR and not (kind == b"\0" and name.endswith("/")):  # V7: a trailing slash is a folder
            yield name, data, size


def local_reader(path: str):
    """(read_at, size, close) of a local file, read with pread (no shared offset between threads)."""
    fd = os.open(path, os.O_RDONLY)
    return (lambda offset, n: os.pread(fd, n, offset)), os.fstat(fd).st_size, (lambda: os.close(fd))


# ---------------------------------------------------------------------------------------------------------------
# the node's listing of each shard


class NodeMemo:
    """Listings of shards kept in `folder` as .npz files (no pickle), one per shard, named by the shard's identity
    (path, size, mtime): a changed shard gets a new name, so a stale listing is never read."""

    def __init__(self, folder: Path):
        self.folder = folder

    def _name(self, identity: str) -> Path:
        return self.folder / f"{hashlib.sha256(identity.encode()).hexdigest()[:32]}.npz"

    def load(self, identity: str) -> dict | None:
        path = self._name(identity)
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["identity"]) != identity:
                    return None
                listing = {k: z[k] for k in LISTING}
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):  # absent, torn, foreign: list again
            return None
        n = len(listing["offset"])
        if any(len(listing[k]) != n for k in ("size", "label", "key_bytes", "hash")) \
                or int(listing["key_bytes"].sum()) != len(listing["keys"]):
            return None
        return listing

    def save(self, identity: str, listing: dict) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".partial")
        except OSError:  # a full or read-only disk: the memo is an optimisation, never a failure
            return
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, identity=np.array(identity), **listing)
            os.replace(tmp, self._name(identity))
        except OSError:
            Path(tmp).unlink(missing_ok=True)

    def locked(self, identity: str):
        """An exclusive lock of one shard's listing (the ranks of a node list a shard once)."""
        return FileLock(self._name(identity).with_suffix(".lock"), best_effort=True)

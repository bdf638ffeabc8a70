"""WebDataset image shards: `<key>.jpg` (or png, webp, ...) with an optional `<key>.cls` label, local or by URL.

The source keeps an index of where each image lies (shard, member offset, size), not the images: numpy arrays of
about 40 bytes per image plus the keys, with a table of key hashes for lookups by key (no dict, no Python object per
image). A DataLoader worker gets it through a memory-mapped file written once by the process that built it (the
pages are shared, not copied per worker), and reads the images it needs by offset. Shards read
through a `pipe:` command have no random access: they serve extraction (one sequential pass) but not training by
key (extract such data with --embed-images, and the cache carries the images).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
from braceexpand import braceexpand

from ..errors import AttncacheError
from ..files import FileLock
from ..store.fs import is_url, node_mirror_dir
from .base import Entry, Source
from .tar_index import NodeMemo, Unsupported, local_reader, walk

WDS_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff")
WDS_LABEL_FIELDS = ("cls", "label", "class", "target")
MAX_LABEL_BYTES = 64
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's own split: key up to the basename's first dot


@dataclass(frozen=True)
class _Member:
    key: str
    label: int
    shard: int
    offset: int
    size: int


MEMBER_DTYPE = np.dtype([("shard", "<u4"), ("offset", "<u8"), ("size", "<u8"), ("label", "<i8"),
                         ("key_offset", "<u8"), ("key_bytes", "<u4")])


class MemberIndex:
    """Where each listed image lies, as arrays: `members` (MEMBER_DTYPE), `keys` (the keys' UTF-8 bytes back to
    back), and the members sorted by a hash of their key (the cache format's key hash): `hashes`, sorted, and
    `order`, the member of each (a lookup is a binary search of `hashes`; a cache's keys are checked against
    `hashes` as a whole, train.loader.check_images)."""

    NAMES = ("members", "keys", "hashes", "order")

    def __init__(self, members: np.ndarray, keys: np.ndarray, hashes: np.ndarray, order: np.ndarray):
        self.members, self.keys, self.hashes, self.order = members, keys, hashes, order

    @classmethod
    def from_listings(cls, listings: list[tuple[int, dict]], limit: int | None = None) -> MemberIndex:
        """The index of (shard number, listing) pairs (`_listing`), concatenated in order; the first `limit`."""
        from ..store.records import key_index_rows

        cat = {name: np.concatenate([x[name] for _, x in listings]) for name in ("offset", "size", "label",
                                                                                  "key_bytes", "keys", "hash")}
        cat["shard"] = np.concatenate([np.full(len(x["offset"]), shard, "<u4") for shard, x in listings])
        n = len(cat["offset"]) if limit is None else min(limit, len(cat["offset"]))
        rows = np.zeros(n, MEMBER_DTYPE)
        for name in ("shard", "offset", "size", "label", "key_bytes"):
            rows[name] = cat[name][:n]
        rows["key_offset"] = np.cumsum(rows["key_bytes"]) - rows["key_bytes"]
        by_hash = key_index_rows(hashes=cat["hash"][:n])
        return cls(rows, cat["keys"][:int(rows["key_bytes"].sum())].copy(), by_hash["hash"].copy(),
                   by_hash["sample"].copy())

    def __len__(self) -> int:
        return len(self.members)

    def key(self, i: int) -> str:
        start = int(self.members["key_offset"][i])
        return self.keys[start:start + int(self.members["key_bytes"][i])].tobytes().decode()

    def find(self, key: str) -> int | None:
        from ..store.records import key_hash

        h = np.uint64(key_hash(key))
        at = int(np.searchsorted(self.hashes, h))
        while at < len(self.hashes) and self.hashes[at] == h:
            i = int(self.order[at])
            if self.key(i) == key:
                return i
            at += 1
        return None

    def save(self, folder: Path) -> None:
        for name in self.NAMES:
            np.save(folder / f"{name}.npy", getattr(self, name), allow_pickle=False)

    @classmethod
    def load(cls, folder: Path) -> MemberIndex:
        return cls(*(np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in cls.NAMES))


class _Entries(Sequence):
    def __init__(self, index: MemberIndex, shards: list[str]):
        self.index, self.shards = index, shards

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Entry:
        if not 0 <= i < len(self.index):
            raise IndexError(i)
        m = self.index.members[i]
        return Entry(self.index.key(i), int(m["label"]), f"{self.shards[m['shard']]}:{m['offset']}:{m['size']}")


class WebDatasetSource(Source):
    def __init__(self, urls: str, limit: int | None = None, option: str = "data"):
        self.urls, self.limit, self.option = urls, limit, option
        self.shards = [u for part in urls.split("::") for u in braceexpand(part)]
        self.description = f"webdataset:{urls}"
        self.classes = []
        self.streamed = any(u.startswith("pipe:") for u in self.shards)
        self._members: MemberIndex | None = None
        self._shared: str | None = None  # the folder the index was saved in for this process's workers
        self._files: dict[tuple[int, int], object] = {}  # open shard files of this process (never pickled)

    def __getstate__(self):  # a worker maps the folder this process mapped (`_shared`), if it listed already
        return {**self.__dict__, "_files": {}, "_members": None}

    def entries(self) -> Sequence[Entry]:
        """The listing as a sequence whose entries are made when indexed (the index's arrays are the listing:
        1.28M `Entry` objects would be ~0.4 GB in the one process that extracts)."""
        return _Entries(self._index(), self.shards)

    def where(self, key: str) -> str:
        i = self._index().find(key)
        return f"{self.shards[self._index().members['shard'][i]]}:{key}" if i is not None \
            else f"{self.description}:{key}"

    def read_key(self, key: str) -> bytes:
        index = self._index().find(key)
        if index is None:
            raise AttncacheError(f"image {key!r}: not found in {self.description}")
        return self.read_index(index)

    def key_hashes(self) -> np.ndarray:
        return self._index().hashes  # the listing's key hashes, sorted (a memory map, see `_index`)

    def missing_keys(self, keys) -> list[str]:
        index = self._index()
        return [k for k in keys if index.find(k) is None]

    def read_index(self, index: int) -> bytes:
        if self.streamed:
            raise AttncacheError(f"`{self.option}` {self.urls}: a pipe: source has no random access to its images; "
                                 "extract with format wds and embed_images so the cache carries them")
        m = self._index().members[index]
        shard = int(m["shard"])
        # one handle per thread and shard: the scan reads on a thread pool, and a shared handle's seek + read
        # would interleave (another image's bytes, or a wrong sha256 recorded)
        slot = (threading.get_ident(), shard)
        f = self._files.get(slot)
        if f is None:
            f = self._files[slot] = fsspec.open(self.shards[shard], "rb").open()
        f.seek(int(m["offset"]))
        return f.read(int(m["size"]))

    def iter_bytes(self, indices):
        if not self.streamed:
            yield from super().iter_bytes(indices)
            return
        wanted = iter(indices)
        target = next(wanted, None)
        for i, (_, data) in enumerate(self._stream()):
            if target is None:
                return
            if i == target:
                yield i, data
                target = next(wanted, None)

    # -- listing ----------------------------------------------------------------------------------------------

    def _index(self) -> MemberIndex:
        if self._members is None:
            if self._shared is None:
                self._shared = str(self._index_folder())
            # Mapped, never held: the pages are the page cache's, shared by every process that maps them.
            self._members = MemberIndex.load(Path(self._shared))
            _return_freed_memory()
        return self._members

    def _build_index(self) -> MemberIndex:
        if self.streamed:
            members = [_Member(key, label, 0, 0, 0) for (key, label), _ in self._stream(keep_bytes=False)]
            listings = [(0, _listing(members[:self.limit] if self.limit is not None else members))]
        else:
            listings = self._list_shards()
        if not sum(len(x["offset"]) for _, x in listings):
            raise AttncacheError(f"`{self.option}` {self.urls}: no samples")
        return MemberIndex.from_listings(listings, self.limit)

    def _index_folder(self) -> Path:
        """Where the index is mapped from. Local shards: the node's copy, kept beside the shards' listings and named
        by every shard's identity (path, size, mtime) and the limit, built by the first process that needs it:
        every rank of the node and their workers map one copy (94 MB for ImageNet, where each rank built and held
        its own), and a later run reads no listing. Otherwise (remote or streamed shards, or a node folder that
        cannot be written): this process's own folder, removed when it exits."""
        node = self._node_folder()
        if node is None:
            return _private_folder(self._build_index())
        with FileLock(node.with_name(node.name + ".lock"), best_effort=True):
            if all((node / f"{name}.npy").is_file() for name in MemberIndex.NAMES):
                return node
            index = self._build_index()
            tmp = None
            try:
                tmp = Path(tempfile.mkdtemp(dir=node.parent, prefix=".partial-"))
                index.save(tmp)
                os.replace(tmp, node)  # whole or not at all
                return node
            except OSError:  # a full or read-only disk: the node's copy is an optimisation, never a failure
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
                return _private_folder(index)

    def _node_folder(self) -> Path | None:
        if self.streamed or any(is_url(u) for u in self.shards):
            return None
        try:
            paths = [u.removeprefix("file://") for u in self.shards]
            identity = "\n".join(f"{os.path.realpath(p)}:{(st := os.stat(p)).st_size}:{st.st_mtime_ns}"
                                 for p in paths) + f"\nlimit={self.limit}"
        except OSError:
            return None  # a missing shard: named when it is listed
        return node_mirror_dir() / "wds-index" / f"all-{hashlib.sha256(identity.encode()).hexdigest()[:32]}"

    def _list_shards(self) -> list[tuple[int, dict]]:
        """Every shard's listing, in shard order. Without a limit each process starts at a shard of its own (by
        pid): the ranks of a node then list different shards at once and map each other's (tar_index.NodeMemo)."""
        n = len(self.shards)
        listings: list[dict | None] = [None] * n
        start = 0 if self.limit is not None else os.getpid() % n
        count = 0
        for i in range(n):
            shard = (start + i) % n
            listings[shard] = self._list_shard(shard)
            count += len(listings[shard]["offset"])
            if self.limit is not None and count >= self.limit:
                break
        return [(shard, x) for shard, x in enumerate(listings) if x is not None]

    def _list_shard(self, shard: int) -> dict:
        url = self.shards[shard]
        try:
            if is_url(url):  # remote: walked through fsspec's file (seek + read), not kept on the node
                with fsspec.open(url, "rb") as f:
                    return self._listing_of(url, shard, lambda at, n: (f.seek(at), f.read(n))[1], f.size)
            path = url.removeprefix("file://")
            st = os.stat(path)
            identity = f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"
            memo = NodeMemo(node_mirror_dir() / "wds-index")
            listing = memo.load(identity)
            if listing is None:
                with memo.locked(identity):
                    listing = memo.load(identity)  # another rank of the node may have listed it meanwhile
                    if listing is None:
                        read_at, size, close = local_reader(path)
                        try:
                            listing = self._listing_of(url, shard, read_at, size)
                        finally:
                            close()
                        memo.save(identity, listing)
            return listing
        except AttncacheError:
            raise
        except (OSError, tarfile.TarError, ValueError) as exc:  # missing shard, broken tar, unreachable URL
            raise AttncacheError(f"`{self.option}` {url}: cannot read webdataset shard ({exc})") from exc

    def _listing_of(self, url: str, shard: int, read_at, size: int) -> dict:
        try:
            members = [(name, offset, n, lambda o=offset, n=n: read_at(o, n))
                       for name, offset, n in walk(read_at, size)]
        except Unsupported:  # a header the fast walk does not parse: tarfile lists this shard
            with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                members = [(info.name, info.offset_data, info.size, lambda info=info: tar.extractfile(info).read())
                           for info in tar if info.isfile()]
                return _listing(list(self._members_of(members, shard, url)))
        return _listing(list(self._members_of(members, shard, url)))

    def _members_of(self, members, shard: int, url: str):
        """Members (name, data offset, size, read) grouped into samples by key, as webdataset groups them."""
        groups: dict[str, dict] = {}
        for name, offset, size, read in members:
            match = _KEY_EXT.match(name)
            if match is None:
                continue
            key, ext = match.groups()
            group = groups.setdefault(key, {"order": len(groups)})
            if ext.lower() in WDS_IMAGE_FIELDS and "image" not in group:
                group["image"] = (offset, size)
            elif ext in WDS_LABEL_FIELDS and "label" not in group and size <= MAX_LABEL_BYTES:
                group["label"] = read()
        for key, group in groups.items():
            if "image" not in group:
                raise AttncacheError(f"`{self.option}` {url}: sample {key!r} has no image field "
                                     f"({', '.join(WDS_IMAGE_FIELDS)})")
            yield _Member(key, _parse_label(group.get("label"), key, f"`{self.option}` {url}"), shard, *group["image"])

    def _stream(self, keep_bytes: bool = True):
        """((key, label), image bytes) in shard order, reading each shard once (pipe: sources)."""
        import webdataset as wds

        try:
            for n, record in enumerate(wds.WebDataset(self.shards, shardshuffle=False, empty_check=False)):
                if self.limit is not None and n >= self.limit:
                    return
                key = record["__key__"]
                field = next((f for f in WDS_IMAGE_FIELDS if f in record), None)
                if field is None:
                    raise AttncacheError(f"`{self.option}` {self.urls}: sample {key!r} has no image field")
                label_field = next((f for f in WDS_LABEL_FIELDS if f in record), None)
                label = _parse_label(record[label_field] if label_field else None, key, f"`{self.option}` {self.urls}")
                yield (key, label), (record[field] if keep_bytes else b"")
        except AttncacheError:
            raise
        except Exception as exc:  # noqa: BLE001 - the pipe's command failed, a broken tar, ...
            raise AttncacheError(f"`{self.option}` {self.urls}: cannot read webdataset ({exc})") from exc


def _private_folder(index: MemberIndex) -> Path:
    """`index` saved into a folder of this process's, removed when it exits (its loader workers map it)."""
    import atexit

    folder = Path(tempfile.mkdtemp(prefix="attncache-wds-index-"))
    index.save(folder)
    atexit.register(shutil.rmtree, folder, True)
    return folder


def _return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim). The listings of 1,280 shards are
    thousands of small arrays that malloc keeps after they are freed: measured at 1.28M images, 93 MB of RSS
    in every training process that listed the source, 3 MB after the trim."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


def _listing(members: list[_Member]) -> dict:
    """One shard's samples as arrays (what tar_index.NodeMemo keeps): offset, size, label, key_bytes, keys and
    their hashes (not the shard's number: the same tar may be another number in another source)."""
    from ..store.records import key_hashes

    encoded = [m.key.encode() for m in members]
    return {"offset": np.array([m.offset for m in members], "<u8"), "size": np.array([m.size for m in members], "<u8"),
            "label": np.array([m.label for m in members], "<i8"),
            "key_bytes": np.array([len(k) for k in encoded], "<u4"),
            "keys": np.frombuffer(b"".join(encoded), np.uint8).copy(), "hash": key_hashes([m.key for m in members])}


def _parse_label(raw: bytes | None, key: str, where: str) -> int:
    if raw is None:
        return -1
    try:
        return int(raw.decode().strip())
    except (UnicodeDecodeError, ValueError) as exc:  # `where`: the shard as its errors name it (option, URL)
        raise AttncacheError(f"{where}: sample {key!r} has a label that is not an integer") from exc

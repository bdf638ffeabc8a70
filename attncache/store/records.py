"""Per-record metadata (format version 5): the samples and views of a cache as fixed-width tables (tables.py).

Four table files, each described in the manifest's `files` with its (rows, rows_per_block, row_bytes):
- `samples.bin`, one row per image in sample order: `key_offset` and `key_bytes` (the key's UTF-8 bytes in
  `keys.bin`), `label`, `width`, `height`, `sha256` (32 raw bytes);
- `keys.bin`, a byte heap (a `u1` table): every key's UTF-8 bytes back to back, in sample order;
- `key_index.bin`, one row per image sorted by (`hash`, `sample`): `hash` is the first 8 bytes of sha256(key) read
  as a little-endian integer, so key -> sample is a binary search over blocks (no dict of every key per process);
- `views.bin`, one row per record in row order (view-major): the record's view, and where views are mixed the
  partner (by sample index), lambda, cutmix box and the partner's own view, and where the teacher ran with
  stochastic depth its keep mask (a bit per block).

The column layout is a function of the manifest alone (`Layout.of`): how many RandAugment ops and erase boxes a
view can carry (the policy's ops per image and erase count), whether views mix, and the teacher's depth. A reader
never takes a layout from the file. docs/format.md lists every column.

Decoding a row turns it into the same JSON a version-4 `views.jsonl` line held and parses that with
`View.from_json`, then checks bounds against the image sizes (`check_view`): one definition of what a valid view
is, whichever version the cache is. Caches of versions 1-4 are read by parsing their JSONL files into the same
tables in memory (`legacy_tables`): small caches, read by the same code.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

import numpy as np

from ..errors import AttncacheError, CacheFormatError
from .tables import MemoryTable, TableReader, rows_per_block_for

SAMPLES_TABLE = "samples.bin"
KEYS_TABLE = "keys.bin"
KEY_INDEX_TABLE = "key_index.bin"
VIEWS_TABLE = "views.bin"
TABLES = (SAMPLES_TABLE, KEYS_TABLE, KEY_INDEX_TABLE, VIEWS_TABLE)

# Codes of names, fixed by the format (never reorder: a code in a cache means the name at that position).
OP_NAMES = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
    "TranslateX", "TranslateY", "Posterize", "PosterizeIncreasing", "PosterizeOriginal", "Solarize",
    "SolarizeIncreasing", "SolarizeAdd", "Color", "ColorIncreasing", "Contrast", "ContrastIncreasing", "Brightness",
    "BrightnessIncreasing", "Sharpness", "SharpnessIncreasing",
)
RESAMPLE_NAMES = ("nearest", "bilinear", "bicubic")
ERASE_FILL_NAMES = ("const", "pixel")
FLIP, RESIZED = 1, 2  # bits of a view's `flags`
NOT_MIXED, MIXUP, CUTMIX = 0, 1, 2  # a record's `mix`
KEY_BLOCK_BYTES = 4 << 10
MAX_KEY_CHARS = 1024
MAX_KEY_BYTES = 4 * MAX_KEY_CHARS  # its UTF-8
MAX_IMAGE_SIDE = 1 << 20

SAMPLE_DTYPE = np.dtype([("key_offset", "<u8"), ("key_bytes", "<u2"), ("label", "<i4"), ("width", "<u4"),
                         ("height", "<u4"), ("sha256", "u1", (32,))])
KEY_INDEX_DTYPE = np.dtype([("hash", "<u8"), ("sample", "<u8")])


@dataclass(frozen=True)
class Layout:
    """What a cache's view rows can hold."""

    augment_slots: int  # RandAugment ops per view, at most
    erase_slots: int  # erase boxes per view, at most
    mixes: bool
    depth_bytes: int  # drop-path keep bits, one per teacher block (0: no masks)

    @classmethod
    def of(cls, manifest: dict) -> Layout:
        from ..views import ViewPolicy
        from ..views.policy import parse_randaugment

        a = ViewPolicy.from_json(manifest["views"]).augment
        depth = manifest["teacher"]["depth"]
        return cls(parse_randaugment(a.randaugment)[1] if a.randaugment else 0,
                   a.erase_count if a.erase_prob > 0 else 0, a.mixes,
                   math.ceil(depth / 8) if a.teacher_drop_path > 0 else 0)

    def view_dtype(self) -> np.dtype:
        a, e = self.augment_slots, self.erase_slots
        cols = [("box", "<f8", (4,)), ("flags", "u1"), ("resize", "<u4", (2,))]
        if a:
            cols += [("augments", "u1"), ("augment_op", "u1", (a,)), ("augment_magnitude", "<f8", (a,)),
                     ("augment_arg", "<f8", (a,)), ("augment_fill", "u1", (a, 3)), ("augment_resample", "u1", (a,))]
        if e:
            cols += [("erases", "u1"), ("erase_box", "<u2", (e, 4)), ("erase_fill", "u1", (e,)),
                     ("erase_key", "u1", (e, 16))]
        return np.dtype(cols)

    def record_dtype(self) -> np.dtype:
        view = self.view_dtype()
        cols = [("view", view)]
        if self.mixes:
            cols += [("mix", "u1"), ("partner", "<u8"), ("lam", "<f8"), ("mix_box", "<u2", (4,)),
                     ("partner_view", view)]
        if self.depth_bytes:
            cols += [("drop_path", "u1", (self.depth_bytes,))]
        return np.dtype(cols)


DEFAULT_ROWS_PER_BLOCK = {SAMPLES_TABLE: rows_per_block_for(SAMPLE_DTYPE.itemsize), KEYS_TABLE: KEY_BLOCK_BYTES,
                          KEY_INDEX_TABLE: rows_per_block_for(KEY_INDEX_DTYPE.itemsize)}


def table_dtypes(manifest: dict) -> dict[str, np.dtype]:
    return {SAMPLES_TABLE: SAMPLE_DTYPE, KEYS_TABLE: np.dtype("u1"), KEY_INDEX_TABLE: KEY_INDEX_DTYPE,
            VIEWS_TABLE: Layout.of(manifest).record_dtype()}


def key_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


# ---------------------------------------------------------------------------------------------------------------
# what a valid sample and view are (every format version)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def sample_problem(s, classes: list) -> str | None:
    if not isinstance(s, dict) or set(s) != {"key", "label", "sha256", "width", "height"}:
        return "expected the fields key, label, sha256, width, height"
    if not isinstance(s["key"], str) or not 0 < len(s["key"]) <= MAX_KEY_CHARS:
        return "key must be a non-empty string"
    if not _is_int(s["label"]) or not -1 <= s["label"] < max(len(classes), 1 << 31):
        return f"label {s['label']!r} invalid"
    if classes and s["label"] >= len(classes):
        return f"label {s['label']} outside the {len(classes)} classes"
    if not isinstance(s["sha256"], str) or len(s["sha256"]) != 64 or s["sha256"].strip("0123456789abcdef"):
        return "sha256 invalid"
    if not all(_is_int(s[d]) and 1 <= s[d] <= MAX_IMAGE_SIDE for d in ("width", "height")):
        return "width/height invalid"
    return None


def check_view(view, sample: dict, partner: dict | None, manifest: dict) -> None:
    """A view of `sample` valid in this cache: no view needs a newer format version than the manifest states,
    every box lies inside what it cuts (the partner's too), and the drop-path masks are there exactly when the
    policy draws them, one per teacher block, at its rate."""
    size = manifest["teacher"]["image_size"]
    if view.needs_version > manifest["version"]:
        raise AttncacheError(f"these view parameters need format version {view.needs_version}")
    view.check_bounds(sample["width"], sample["height"], size)
    if view.mix is not None:
        view.mix.view.check_bounds(partner["width"], partner["height"], size)
    rate = manifest["views"].get("augment", {}).get("teacher_drop_path", 0.0)
    if (view.drop_path.rate if view.drop_path is not None else 0.0) != rate:
        raise AttncacheError(f"drop_path masks must be there exactly when views.augment.teacher_drop_path is set, "
                             f"at its rate ({rate})")
    if view.drop_path is not None and len(view.drop_path.keep) != manifest["teacher"]["depth"]:
        raise AttncacheError(f"drop_path keeps {len(view.drop_path.keep)} blocks, the teacher has "
                             f"{manifest['teacher']['depth']}")


# ---------------------------------------------------------------------------------------------------------------
# encoding (extraction, and versions 1-4 read into tables)


class SampleRows:
    """Samples as the samples table holds them, in memory: `rows` (SAMPLE_DTYPE) and `heap` (the keys' UTF-8 bytes
    back to back), about 54 bytes and the key per image, with no Python object per image (what an extraction
    holds while it scans and draws ImageNet's 1.28M images). Indexing gives one sample's dict, made when asked."""

    def __init__(self, rows: np.ndarray, heap: bytes):
        self.rows, self.heap = rows, heap

    def __len__(self) -> int:
        return len(self.rows)

    def key(self, index: int) -> str:
        start = int(self.rows["key_offset"][index])
        return self.heap[start:start + int(self.rows["key_bytes"][index])].decode()

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        return {"key": self.key(index), "label": int(row["label"]), "sha256": row["sha256"].tobytes().hex(),
                "width": int(row["width"]), "height": int(row["height"])}

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def keys(self):
        return (self.key(i) for i in range(len(self)))


def sample_rows(samples, key_offset: int = 0) -> tuple[np.ndarray, bytes]:
    """Rows of samples (dicts key/label/sha256/width/height, or `SampleRows`) and their keys' heap bytes, the first
    key at `key_offset` of the heap."""
    if isinstance(samples, SampleRows):
        rows = samples.rows.copy()
        rows["key_offset"] += key_offset
        return rows, bytes(samples.heap)
    keys = [s["key"].encode() for s in samples]
    rows = np.zeros(len(keys), SAMPLE_DTYPE)
    lengths = np.array([len(k) for k in keys], dtype=np.int64)
    rows["key_bytes"] = lengths
    rows["key_offset"] = key_offset + np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(keys) else 0
    rows["label"] = [s["label"] for s in samples]
    rows["width"] = [s["width"] for s in samples]
    rows["height"] = [s["height"] for s in samples]
    rows["sha256"] = np.frombuffer(b"".join(bytes.fromhex(s["sha256"]) for s in samples), np.uint8).reshape(-1, 32)
    return rows, b"".join(keys)


def key_hashes(keys, count: int | None = None) -> np.ndarray:
    """The key hashes of `keys` (a list, or an iterable of `count` keys: none held at once)."""
    return np.fromiter((key_hash(k) for k in keys), np.uint64, len(keys) if count is None else count)


def key_index_rows(keys=None, hashes: np.ndarray | None = None) -> np.ndarray:
    """The key index of `keys` (or of their `key_hashes`): (hash, sample) sorted by hash, then sample."""
    hashes = key_hashes(keys) if hashes is None else hashes
    rows = np.zeros(len(hashes), KEY_INDEX_DTYPE)
    rows["hash"] = hashes
    rows["sample"] = np.arange(len(hashes), dtype=np.uint64)
    return rows[np.lexsort((rows["sample"], rows["hash"]))]


def _view_tuple(view, layout: Layout) -> tuple:
    flags = (FLIP if view.flip else 0) | (RESIZED if view.resize is not None else 0)
    out = [view.box, flags, view.resize or (0, 0)]
    a, e = layout.augment_slots, layout.erase_slots
    if len(view.augment) > a or len(view.erase) > e:
        raise AttncacheError(f"a view with {len(view.augment)} augment ops and {len(view.erase)} erase boxes does not "
                             f"fit the policy's {a} and {e}")
    if a:
        ops = view.augment
        pad = a - len(ops)
        out += [len(ops), [OP_NAMES.index(op.name) for op in ops] + [0] * pad,
                [op.magnitude for op in ops] + [0.0] * pad,
                [float(op.args[0]) if op.args else 0.0 for op in ops] + [0.0] * pad,
                [op.fill for op in ops] + [(0, 0, 0)] * pad,
                [RESAMPLE_NAMES.index(op.resample) for op in ops] + [0] * pad]
    if e:
        boxes = view.erase
        pad = e - len(boxes)
        out += [len(boxes), [x.box for x in boxes] + [(0, 0, 0, 0)] * pad,
                [ERASE_FILL_NAMES.index(x.fill) for x in boxes] + [0] * pad,
                [list(bytes.fromhex(x.key)) if x.key else [0] * 16 for x in boxes] + [[0] * 16] * pad]
    return tuple(out)




def record_rows(views, layout: Layout) -> np.ndarray:
    """The rows of these views (in row order). Mixed views must know their partner's sample index."""
    from ..views import View

    empty = _view_tuple(View(box=(0.0, 0.0, 1.0, 1.0)), layout)
    rows = []
    for view in views:
        row = [_view_tuple(view, layout)]
        if layout.mixes:
            mix = view.mix
            if mix is None:
                row += [NOT_MIXED, 0, 1.0, (0, 0, 0, 0), empty]
            else:
                if mix.partner_index < 0:
                    raise AttncacheError(f"mix partner {mix.partner!r}: its sample index is not known")
                row += [CUTMIX if mix.box is not None else MIXUP, mix.partner_index, mix.lam,
                        mix.box or (0, 0, 0, 0), _view_tuple(mix.view, layout)]
        elif view.mix is not None:
            raise AttncacheError("a mixed view in a cache whose policy does not mix")
        if layout.depth_bytes:
            if view.drop_path is None:
                raise AttncacheError("a view without drop-path masks in a cache whose teacher ran with them")
            bits = np.packbits(np.array(view.drop_path.keep, dtype=bool), bitorder="little")
            row.append(np.pad(bits, (0, layout.depth_bytes - len(bits))))
        elif view.drop_path is not None:
            raise AttncacheError("drop-path masks in a cache whose policy draws none")
        rows.append(tuple(row))
    return np.array(rows, dtype=layout.record_dtype())


# ---------------------------------------------------------------------------------------------------------------
# decoding


def _view_json(v, layout: Layout) -> dict:
    """A row's view (a `view_dtype` record as a tuple from `.item()`) as its JSON (what View.from_json reads)."""
    box, flags, resize = v[0], v[1], v[2]
    if flags & ~(FLIP | RESIZED):
        raise AttncacheError(f"view flags {flags}: unknown bits")
    out = {"box": box.tolist(), "flip": bool(flags & FLIP)}
    if flags & RESIZED:
        out["resize"] = resize.tolist()
    i = 3
    if layout.augment_slots:
        count, ops, mags, args, fills, resamples = v[i:i + 6]
        i += 6
        if count > layout.augment_slots:
            raise AttncacheError(f"{count} augment ops, the layout holds {layout.augment_slots}")
        if count:
            out["augment"] = [_op_json(int(ops[j]), float(mags[j]), float(args[j]), fills[j].tolist(),
                                       int(resamples[j])) for j in range(count)]
    if layout.erase_slots:
        count, boxes, fills, keys = v[i:i + 4]
        if count > layout.erase_slots:
            raise AttncacheError(f"{count} erase boxes, the layout holds {layout.erase_slots}")
        if count:
            out["erase"] = [_erase_json(boxes[j].tolist(), int(fills[j]), keys[j]) for j in range(count)]
    return out


def _op_json(op: int, magnitude: float, arg: float, fill: list, resample: int) -> dict:
    from ..views.augment import INTEGER_ARG_OPS, OP_ARG_BOUNDS

    if op >= len(OP_NAMES) or resample >= len(RESAMPLE_NAMES):
        raise AttncacheError(f"augment op code {op} / resample code {resample}: unknown")
    name = OP_NAMES[op]
    args = [] if not OP_ARG_BOUNDS[name] else [int(arg) if name in INTEGER_ARG_OPS and arg.is_integer() else arg]
    return {"op": name, "magnitude": magnitude, "args": args, "fill": fill, "resample": RESAMPLE_NAMES[resample]}


def _erase_json(box: list, fill: int, key: np.ndarray) -> dict:
    if fill >= len(ERASE_FILL_NAMES):
        raise AttncacheError(f"erase fill code {fill}: unknown")
    out = {"box": box, "fill": ERASE_FILL_NAMES[fill]}
    if fill == ERASE_FILL_NAMES.index("pixel"):
        out["key"] = key.tobytes().hex()
    elif key.any():
        raise AttncacheError("erase: a 'const' fill carries no noise key")
    return out


def record_json(row, layout: Layout, num_samples: int, rate: float, depth: int) -> dict:
    """A views-table row as the JSON of its view; a mixed view's partner as {"partner_index": i} (the caller
    names the key)."""
    fields = row.item()
    out = _view_json(fields[0], layout)
    i = 1
    if layout.mixes:
        mix, partner, lam, box, partner_view = fields[1:6]
        i = 6
        if mix not in (NOT_MIXED, MIXUP, CUTMIX):
            raise AttncacheError(f"mix code {mix}: unknown")
        if mix != NOT_MIXED:
            if partner >= num_samples:
                raise AttncacheError(f"mix partner {partner} outside the {num_samples} samples")
            out["mix"] = {"partner_index": int(partner), "view": _view_json(partner_view, layout), "lam": lam,
                          **({"box": box.tolist()} if mix == CUTMIX else {})}
    if layout.depth_bytes:
        bits = np.unpackbits(fields[i], bitorder="little").astype(bool)
        if bits[depth:].any():
            raise AttncacheError(f"drop_path: bits set beyond the teacher's {depth} blocks")
        out["drop_path"] = {"rate": rate, "keep": bits[:depth].tolist()}
    return out


# ---------------------------------------------------------------------------------------------------------------
# reading: the tables of an open cache


class RecordTables:
    """A cache's samples and views, read by row. `tables`: {name: TableReader or MemoryTable}."""

    def __init__(self, tables: dict, manifest: dict, where: dict[str, str]):
        self.samples_table, self.keys_table = tables[SAMPLES_TABLE], tables[KEYS_TABLE]
        self.key_index, self.views_table = tables[KEY_INDEX_TABLE], tables[VIEWS_TABLE]
        self.where = where
        self.manifest = manifest
        self.layout = Layout.of(manifest)
        self.num_samples = manifest["dataset"]["num_samples"]
        self.records = manifest["store"]["records"]
        self.size = manifest["teacher"]["image_size"]
        self.depth = manifest["teacher"]["depth"]
        self.rate = manifest["views"].get("augment", {}).get("teacher_drop_path", 0.0)
        self.classes = len(manifest["dataset"]["classes"])
        self.version = manifest["version"]

    @classmethod
    def open(cls, fs, manifest: dict) -> RecordTables:
        dtypes = table_dtypes(manifest)
        tables = {}
        for name in TABLES:
            t = manifest["files"][name]["table"]
            tables[name] = TableReader(fs, name, dtypes[name], t["rows"], t["rows_per_block"])
        return cls(tables, manifest, {name: fs.where(name) for name in TABLES})

    def samples_seq(self) -> _Rows:
        """The samples as a sequence of dicts (what the view policy and the extraction pipeline index)."""
        return _Rows(self.num_samples, self.sample)

    def views_seq(self) -> _Rows:
        """The views as a sequence of `View`, by row."""
        return _Rows(self.records, self.view)

    # -- samples ------------------------------------------------------------------------------------------------

    def _error(self, name: str, row: int, exc: Exception) -> CacheFormatError:
        return CacheFormatError(f"{self.where[name]}: row {row}: {exc}")

    def sample_rows(self, indices) -> np.ndarray:
        return self.samples_table.take(indices)

    def key_of(self, row) -> str:
        """The key of a samples-table row."""
        start, length = int(row["key_offset"]), int(row["key_bytes"])
        if not 0 < length <= MAX_KEY_BYTES or start + length > self.keys_table.rows:
            raise AttncacheError(f"key at {start}+{length} outside the {self.keys_table.rows}-byte key heap")
        data = self.keys_table.slice(start, start + length).tobytes()
        try:
            return data.decode()
        except UnicodeDecodeError as exc:
            raise AttncacheError(f"its key ({KEYS_TABLE} bytes {start}..{start + length - 1}) is not UTF-8") from exc

    def sample(self, index: int) -> dict:
        """{key, label, sha256, width, height} of sample `index`, checked."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} outside 0..{self.num_samples - 1}")
        row = self.samples_table.row(index)
        try:
            s = {"key": self.key_of(row), "label": int(row["label"]), "sha256": row["sha256"].tobytes().hex(),
                 "width": int(row["width"]), "height": int(row["height"])}
            bad = sample_problem(s, self.manifest["dataset"]["classes"])
            if bad:
                raise AttncacheError(bad)
        except AttncacheError as exc:
            raise self._error(SAMPLES_TABLE, index, exc) from exc
        return s

    def labels(self, indices) -> np.ndarray:
        rows = self.sample_rows(indices)
        labels = rows["label"].astype(np.int64)
        bad = (labels < -1) | ((labels >= self.classes) if self.classes else False)
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise CacheFormatError(f"{self.where[SAMPLES_TABLE]}: row {int(np.asarray(indices)[j])}: label "
                                   f"{labels[j]} invalid")
        return labels

    def index_of(self, key: str) -> int | None:
        """The sample index of `key`, or None: a binary search of the key index's blocks, then of one block."""
        table, h = self.key_index, np.uint64(key_hash(key))
        per = getattr(table, "rows_per_block", table.rows) or 1
        lo, hi = 0, -(-table.rows // per)  # blocks whose first hash <= h: the match is in the last of them or next
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if table.slice(mid * per, mid * per + 1)["hash"][0] <= h:
                lo = mid
            else:
                hi = mid
        for b in (lo, lo - 1) if lo else (lo,):  # equal hashes may begin in the block before
            block = table.slice(b * per, (b + 1) * per)
            first = int(np.searchsorted(block["hash"], h, side="left"))
            for j in range(first, len(block)):
                if block["hash"][j] != h:
                    break
                index = int(block["sample"][j])
                if index < self.num_samples and self.sample(index)["key"] == key:
                    return index
        return None

    def iter_key_hashes(self, chunk: int = 1 << 16):
        """The key index's rows (hash, sample), a chunk at a time, sorted by hash: a cache's keys checked against a
        source's as arrays (train.loader.check_images), never a Python string per key."""
        for start in range(0, self.key_index.rows, chunk):
            rows = self.key_index.slice(start, min(self.key_index.rows, start + chunk))
            if (rows["sample"] >= self.num_samples).any():
                raise CacheFormatError(f"{self.where[KEY_INDEX_TABLE]}: rows {start}..: a sample index outside the "
                                       f"{self.num_samples} samples")
            yield rows

    def iter_keys(self, chunk: int = 1 << 16):
        """Every key in sample order, a chunk at a time (a whole-cache pass holds one chunk): the keys of a chunk
        must lie back to back in the heap, as extraction writes them."""
        for start in range(0, self.num_samples, chunk):
            rows = self.samples_table.slice(start, min(self.num_samples, start + chunk))
            offsets, lengths = rows["key_offset"].astype(np.int64), rows["key_bytes"].astype(np.int64)
            first, end = int(offsets[0]), int(offsets[-1] + lengths[-1])
            if ((lengths < 1) | (lengths > MAX_KEY_BYTES)).any() or (offsets[1:] != offsets[:-1] + lengths[:-1]).any() \
                    or end > self.keys_table.rows:
                raise CacheFormatError(f"{self.where[SAMPLES_TABLE]}: rows {start}..{start + len(rows) - 1}: key "
                                       "offsets are not consecutive lengths inside the key heap")
            heap = self.keys_table.slice(first, end).tobytes()
            cuts = (offsets - first).tolist() + [end - first]
            try:
                yield [heap[a:b].decode() for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
            except UnicodeDecodeError as exc:
                raise CacheFormatError(f"{self.where[KEYS_TABLE]}: a key of rows {start}.. is not UTF-8") from exc

    # -- views ---------------------------------------------------------------------------------------------------

    def view(self, row: int):
        """The checked `View` of record `row` (see `check_view`)."""
        from ..views import View

        if not 0 <= row < self.records:
            raise IndexError(f"row {row} outside 0..{self.records - 1}")
        sample_index = row % self.num_samples  # rows are view-major (format.row_of)
        try:
            d = record_json(self.views_table.row(row), self.layout, self.num_samples, self.rate, self.depth)
            partner = None
            if "mix" in d:
                partner_index = d["mix"].pop("partner_index")
                if partner_index == sample_index:
                    raise AttncacheError("a view is mixed with its own image")
                partner = self.samples_table.row(partner_index)
                d["mix"]["partner"] = self.key_of(partner)
            view = View.from_json(d)
            if view.mix is not None:
                view = replace(view, mix=replace(view.mix, partner_index=partner_index))
            check_view(view, self.samples_table.row(sample_index), partner, self.manifest)
        except AttncacheError as exc:
            raise self._error(VIEWS_TABLE, row, exc) from exc
        return view


class _Rows:
    """A read-only sequence whose items are read when indexed."""

    def __init__(self, length: int, get):
        self.length, self.get = length, get

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.get(index)


def memory_tables(samples: list[dict], views: list, manifest: dict, where: dict[str, str]) -> RecordTables:
    """Tables in memory of a cache's samples and `View`s (versions 1-4 after parsing their JSONL files)."""
    rows, heap = sample_rows(samples)
    layout = Layout.of(manifest)
    tables = {SAMPLES_TABLE: MemoryTable(rows), KEYS_TABLE: MemoryTable(np.frombuffer(heap, np.uint8)),
              KEY_INDEX_TABLE: MemoryTable(key_index_rows([s["key"] for s in samples])),
              VIEWS_TABLE: MemoryTable(record_rows(views, layout))}
    return RecordTables(tables, manifest, where)


def table_entry_rows(manifest: dict) -> dict[str, int | None]:
    """The rows each table must have (None: the key heap, whose size the samples decide)."""
    n = manifest["dataset"]["num_samples"]
    return {SAMPLES_TABLE: n, KEYS_TABLE: None, KEY_INDEX_TABLE: n, VIEWS_TABLE: manifest["store"]["records"]}




# ---------------------------------------------------------------------------------------------------------------
# writing (extraction)


def _hashes_of(samples) -> np.ndarray:
    keys = samples.keys() if isinstance(samples, SampleRows) else (s["key"] for s in samples)
    return key_hashes(keys, len(samples))


def write_tables(out, samples, view_rows, layout: Layout) -> dict[str, dict]:
    """Write the four tables of `samples` (dicts or `SampleRows`) and `view_rows` (an iterable of views-table row
    arrays in row order, e.g. `record_rows` of a span of views: the views are never all in memory) into folder
    `out`; returns their file entries."""
    from pathlib import Path

    from .tables import TableWriter, write_table

    out = Path(out)
    rows, heap = sample_rows(samples)
    entries = {SAMPLES_TABLE: write_table(out / SAMPLES_TABLE, rows, DEFAULT_ROWS_PER_BLOCK[SAMPLES_TABLE]),
               KEYS_TABLE: write_table(out / KEYS_TABLE, np.frombuffer(heap, np.uint8),
                                       DEFAULT_ROWS_PER_BLOCK[KEYS_TABLE]),
               KEY_INDEX_TABLE: write_table(out / KEY_INDEX_TABLE, key_index_rows(hashes=_hashes_of(samples)),
                                            DEFAULT_ROWS_PER_BLOCK[KEY_INDEX_TABLE])}
    dtype = layout.record_dtype()
    writer = TableWriter(out / VIEWS_TABLE, dtype, rows_per_block_for(dtype.itemsize))
    try:
        for chunk in view_rows:
            writer.append(chunk)
    except BaseException:
        writer.abort()
        raise
    entries[VIEWS_TABLE] = writer.close()
    return entries

#!/usr/bin/env python
"""Per-record cost of reading a zarr cache: zarr's own array reads vs attncache's shard-index reader.

Both read the same records of the same cache, in the same random order: one record at a time, a run of 8
consecutive records, and a batch of 8 random records (what a shuffled training batch reads); both decode to the
same numpy arrays (checked). The blosc decompression alone (into a ready buffer, one thread) is timed on the same
compressed chunks, so each reader's overhead beyond it is visible. attncache's reader runs with 1 decode thread and
with `--threads` (its default: the cores, at most 4). blosc itself is held to one thread, so the rows compare cost
per core:

    python benchmarks/reader_overhead.py CACHE [--records 32] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import time

import numcodecs
import numpy as np
import zarr

from attncache import open_cache


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cache")
    p.add_argument("--records", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="decode threads of the second attncache row (0: default)")
    args = p.parse_args()

    cache = open_cache(args.cache)
    if cache.manifest["store"]["format"] != "zarr":
        raise SystemExit("a zarr cache, please")
    numcodecs.blosc.set_nthreads(1)
    reader = cache.reader
    threads = args.threads or getattr(reader, "threads", getattr(reader, "read_threads", 1))
    field = next(iter(reader.fields))
    array = zarr.open_group(args.cache, mode="r")[field]
    rng = np.random.default_rng(0)
    rows = rng.choice(len(cache), size=min(args.records, len(cache)), replace=False).tolist()
    first = rows[0] - rows[0] % reader.records_per_shard  # 8 consecutive records of one shard
    run = list(range(first, min(len(cache), first + 8)))
    batch = rows[:8]

    for row in rows[:4]:  # the same numbers from both readers
        assert np.array_equal(array[row], reader.read([row])[field][0])

    blobs = [reader.stored(field, row)[:-4] for row in rows]  # compressed chunks without their crc32c
    spec = reader.fields[field]
    buffer = np.empty(spec.nbytes, np.uint8)
    n = len(rows)

    def ms(fn, count):
        return round(1e3 * best(fn, args.repeats) / count, 2)

    def with_threads(count):
        def timed(fn, rows_):
            reader.threads = count
            return ms(fn, len(rows_))
        return {
            "one_by_one": timed(lambda: [reader.read([r]) for r in rows], rows),
            "run_of_8": timed(lambda: reader.read(run), run),
            "random_batch_of_8": timed(lambda: reader.read(batch), batch),
        }

    results = {
        "records": n, "record_bytes": spec.nbytes, "threads": threads,
        "ms_per_record": {
            "blosc_decompress_only": ms(lambda: [numcodecs.blosc.decompress(b, buffer) for b in blobs], n),
            "zarr_array": {"one_by_one": ms(lambda: [array[r] for r in rows], n),
                           "run_of_8": ms(lambda: array[run[0]:run[-1] + 1], len(run)),
                           "random_batch_of_8": ms(lambda: array.get_orthogonal_selection(sorted(batch)), 8)},
            "attncache_1_thread": with_threads(1),
            f"attncache_{threads}_threads": with_threads(threads),
        },
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

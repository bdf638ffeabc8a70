#!/usr/bin/env python
"""Per-record cost of reading a zarr cache: zarr's own array reads vs attncache's shard-index reader.

Both read the same records of the same cache, in the same random order, one record at a time and in runs of
consecutive records, and decode to the same numpy arrays (checked). The blosc decompression alone is timed on the
same compressed chunks, so each reader's overhead beyond it is visible:

    python benchmarks/reader_overhead.py CACHE [--records 32] [--repeats 3]
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
    args = p.parse_args()

    cache = open_cache(args.cache)
    if cache.manifest["store"]["format"] != "zarr":
        raise SystemExit("a zarr cache, please")
    numcodecs.blosc.set_nthreads(1)
    field = next(iter(cache.reader.fields))
    array = zarr.open_group(args.cache, mode="r")[field]
    rng = np.random.default_rng(0)
    rows = rng.choice(len(cache), size=min(args.records, len(cache)), replace=False).tolist()
    first = rows[0] - rows[0] % cache.reader.records_per_shard  # 8 consecutive records of one shard
    run = list(range(first, min(len(cache), first + 8)))

    for row in rows[:4]:  # the same numbers from both readers
        assert np.array_equal(array[row], cache.reader.read([row])[field][0])

    blobs = [cache.reader.stored(field, row) for row in rows]  # the compressed chunks: decompression alone
    codec = numcodecs.get_codec(dict(cache.manifest["codec"]["compressor"]))
    n = len(rows)
    results = {
        "records": n, "record_bytes": int(np.prod(array.shape[1:]) * array.dtype.itemsize),
        "ms_per_record": {
            "blosc_decompress_only": 1e3 * best(lambda: [codec.decode(b) for b in blobs], args.repeats) / n,
            "zarr_array_one_by_one": 1e3 * best(lambda: [array[r] for r in rows], args.repeats) / n,
            "attncache_one_by_one": 1e3 * best(lambda: [cache.reader.read([r]) for r in rows], args.repeats) / n,
            "zarr_array_run_of_8": 1e3 * best(lambda: array[run[0]:run[-1] + 1], args.repeats) / len(run),
            "attncache_run_of_8": 1e3 * best(lambda: cache.reader.read(run), args.repeats) / len(run),
        },
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

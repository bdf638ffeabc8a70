#!/usr/bin/env python
"""What listing a webdataset source costs as images grow: ImageNet-1k is 1.28M images in ~1,300 tars.

It writes N images (1,000 per tar; each a `.jpg` member of 200 random bytes and a `.cls` label, as ImageNet shards
hold them; the listing never decodes an image, so the bytes need not be one) once per DIR, then lists the source in
fresh processes: with Python's tarfile (what attncache 0.4.0 did), with the header walk and an empty node memo (a
node's first run), and again with the memo filled (every later process on the node). Imports are excluded.

    python benchmarks/scale_source.py /tmp/src 10000 100000 1280000
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

PER_TAR = 1000

CHILD = r"""
import os, sys, time, tarfile, resource
from attncache.sources.webdataset import WebDatasetSource
urls, how = sys.argv[1], sys.argv[2]
source = WebDatasetSource(urls)
start, cpu = time.perf_counter(), time.process_time()
if how == "tarfile":
    n = 0
    for url in source.shards:
        with tarfile.open(url, "r:") as tar:
            for info in tar:
                if info.isfile() and info.name.endswith(".cls"):
                    tar.extractfile(info).read()
                n += info.name.endswith(".jpg")
else:
    n = len(source._index())
print(n, time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      time.process_time() - cpu)
"""


def build(root: Path, n: int) -> str:
    tars = -(-n // PER_TAR)
    urls = f"{root}/shard-{{{0:05d}..{tars - 1:05d}}}.tar"
    if (root / "done").exists():
        return urls
    root.mkdir(parents=True, exist_ok=True)
    payload = os.urandom(200)
    for t in range(tars):
        with tarfile.open(root / f"shard-{t:05d}.tar", "w", format=tarfile.GNU_FORMAT) as tar:
            for i in range(t * PER_TAR, min(n, (t + 1) * PER_TAR)):
                key = f"n{i % 1000:08d}/n{i % 1000:08d}_{i}"
                for ext, data in (("jpg", payload), ("cls", str(i % 1000).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (root / "done").write_text(str(n))
    return urls


def listing(urls: str, how: str, memo: Path) -> tuple[int, float, float, float]:
    env = {**os.environ, "ATTNCACHE_MIRROR_DIR": str(memo)}
    out = subprocess.run([sys.executable, "-c", CHILD, urls, how], env=env, check=True, capture_output=True,
                         text=True).stdout.split()
    return int(out[0]), float(out[1]), float(out[2]), float(out[3])


def main() -> None:
    work, sizes = Path(sys.argv[1]), [int(x) for x in sys.argv[2:]]
    print("| images | tars | tarfile s | header walk, empty memo s | memo filled s | CPU µs/image (tarfile / walk / "
          "memo) | peak RSS MB (memo filled) | load |")
    print("|---|---|---|---|---|---|---|---|")
    for n in sizes:
        start = time.perf_counter()
        urls = build(work / f"n{n}", n)
        print(f"built {n:,} images in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        memo = work / f"memo{n}"
        subprocess.run(["rm", "-rf", str(memo)], check=True)
        for f in (work / f"n{n}").glob("*.tar"):  # pages warm: what is measured is parsing, not the disk
            f.read_bytes()
        seen = [listing(urls, "tarfile", memo), listing(urls, "walk", memo), listing(urls, "walk", memo)]
        assert len({s[0] for s in seen}) == 1, seen
        t, cpu = [s[1] for s in seen], [s[3] for s in seen]
        print(f"| {n:,} | {-(-n // PER_TAR):,} | {t[0]:.2f} | {t[1]:.2f} | {t[2]:.2f} | "
              f"{' / '.join(f'{x / n * 1e6:.1f}' for x in cpu)} | {seen[2][2]:.0f} | {os.getloadavg()[0]:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()

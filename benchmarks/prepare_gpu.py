"""`make prepare-gpu`: the wheels attncache needs that the GPU machine lacks, built for its Python 3.12, in .whl/.

The GPU machine reaches no package registry. Its image (docs/benchmarks.md, "GPU") has Python 3.12 with torch,
timm, typer, rich, fsspec, safetensors, matplotlib, numpy, pillow, pyyaml, attrs, aiohttp, requests and packaging
(`ON_THE_IMAGE`), but not zarr, numcodecs, webdataset, google-crc32c, jsonschema or braceexpand, nor the
dependencies of theirs it lacks (`CARRIED`). Each is downloaded at the version this checkout's .venv runs (the
version its tests pass with); a wheel already there is kept, one of another version removed: run it again after
upgrading the venv. `benchmarks/gpu_run.sh` installs them on the device with `pip --no-index --no-deps`.

`check()` (tests/test_bench_gpu.py runs it) proves the list complete: every requirement of attncache and of the
carried packages, as the venv's metadata states them for Python 3.12 on Linux, is carried or on the image.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

CARRIED = ("zarr", "numcodecs", "google-crc32c", "donfig", "webdataset", "braceexpand", "jsonschema",
           "jsonschema-specifications", "referencing", "rpds-py")
ON_THE_IMAGE = ("torch", "torchvision", "timm", "numpy", "typer", "rich", "fsspec", "safetensors", "matplotlib",
                "pillow", "pyyaml", "attrs", "aiohttp", "requests", "packaging", "typing-extensions")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
          "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
LIMIT = 48 * 2**20  # a device call carries 64 MiB: the wheels and the working tree together


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wanted() -> dict[str, str]:
    """Carried distribution -> the version installed here."""
    return {name: metadata.version(name) for name in CARRIED}


def requirements(dist: str) -> set[str]:
    """Names `dist` requires on the GPU machine (markers evaluated for Python 3.12 on Linux, extras left out)."""
    from packaging.requirements import Requirement

    names = set()
    for line in metadata.requires(dist) or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(TARGET):
            names.add(normalize(req.name))
    return names


def check() -> list[str]:
    """What attncache or a carried package needs that is neither carried nor on the image (should be nothing)."""
    have = {normalize(n) for n in CARRIED + ON_THE_IMAGE}
    return sorted(f"{dist} needs {need}" for dist in ("attncache", *CARRIED) for need in requirements(dist)
                  if need not in have)


def wheel_name(path: Path) -> tuple[str, str]:
    """(normalized distribution, version) of a wheel file name."""
    dist, version = path.name.split("-")[:2]
    return normalize(dist), version


def prepare(dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    want = {normalize(n): (n, v) for n, v in wanted().items()}
    for path in sorted(dest.glob("*.whl")):  # one version of each: two would stop the whole install
        dist, version = wheel_name(path)
        if dist not in want or want[dist][1] != version:
            print(f"prepare-gpu: removing {path.name}")
            path.unlink()
    have = {wheel_name(p)[0] for p in dest.glob("*.whl")}
    for dist, (name, version) in sorted(want.items()):
        if dist in have:
            continue
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp",
               *[arg for p in PLATFORMS for arg in ("--platform", p)], "-d", str(dest), f"{name}=={version}"]
        print(f"prepare-gpu: downloading {name}=={version}")
        subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob("*.whl"))
    missing = set(want) - {wheel_name(p)[0] for p in wheels}
    if missing:
        raise SystemExit(f"prepare-gpu: no wheel for {sorted(missing)}")
    total = sum(p.stat().st_size for p in wheels)
    if total > LIMIT:
        raise SystemExit(f"prepare-gpu: {total / 2**20:.1f} MiB of wheels, over the {LIMIT / 2**20:.0f} MiB budget")
    print(f"prepare-gpu: {len(wheels)} wheels, {total / 2**20:.1f} MiB in {dest}")
    return wheels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", type=Path, default=Path(".whl"))
    args = ap.parse_args(argv)
    problems = check()
    if problems:
        raise SystemExit("prepare-gpu: not carried and not on the image: " + "; ".join(problems))
    prepare(args.dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())

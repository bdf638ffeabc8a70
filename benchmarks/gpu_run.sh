#!/usr/bin/env bash
# The GPU check in one device call (docs/benchmarks.md, "GPU"): on the bare GPU machine, install the wheels
# `make prepare-gpu` put in .whl/ (carried with the call), take attncache from this checkout (PYTHONPATH, no build),
# then run `make bench-gpu`'s script with the image's python3. The table, the JSON and the log land in $OUT.
# Arguments go to benchmarks/bench_gpu.py (e.g. --budget 200). Here, without a GPU: `make bench-gpu
# BENCH_GPU_ARGS=--cpu-tiny`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench_out/gpu}"
SITE="${SITE:-/tmp/site}"  # where the wheels install (a fresh machine's /tmp)
mkdir -p "$OUT"
ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu_run: no wheels in .whl/: run make prepare-gpu and carry .whl" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
  || exit 2
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import attncache.extract, attncache.train, zarr, numcodecs, webdataset, jsonschema" || exit 2
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
# bench_gpu.py keeps to its own budget (270 s by default) and stops itself 20 s past it; this is the last guard.
timeout -k 10 320 python3 benchmarks/bench_gpu.py --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"

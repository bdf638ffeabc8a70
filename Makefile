# attncache — everything a newcomer needs is `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo_out

.PHONY: install test test-long test-slow demo bench bench-gpu prepare-gpu lint clean

# (Re)install when the venv is missing or pyproject.toml changed since the last install.
# pip runs with -qq: its errors still show, its warnings and the build backend's banners do not.
$(STAMP): pyproject.toml
	@echo "make: installing attncache and its dependencies (torch, timm, zarr, ...) into $(VENV)/;" \
	  "a few minutes the first time"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -qq --upgrade pip
	@$(BIN)/python -m pip install -qq -e '.[dev]'
	@touch $(STAMP)
	@echo "make: installed"

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The walks of minutes (SIGKILL at random points, torchrun ranks, the scale bench): CI runs them after `make test`.
test-long: $(STAMP)
	$(BIN)/python -m pytest -q -m long

test-slow: $(STAMP)
	@$(BIN)/python -m pip install -qq -e '.[dev,bench]'
	$(BIN)/python -m pytest -q -m slow

demo: $(STAMP)
	$(BIN)/attncache demo --out $(DEMO_OUT)

bench: $(STAMP)
	$(BIN)/attncache bench extract --teacher demo --data demo --out $(DEMO_OUT)/bench
	$(BIN)/attncache bench codecs --teacher demo --data demo:64
	test -f $(DEMO_OUT)/train_cache/manifest.json || $(MAKE) demo
	$(BIN)/attncache bench train --cache $(DEMO_OUT)/train_cache --data demo \
	  --weights $(DEMO_OUT)/teacher_run/model.safetensors --out $(DEMO_OUT)/bench_train

# The GPU check (docs/benchmarks.md, "GPU"): prepare-gpu downloads the wheels the device lacks into .whl/ (pinned to
# this venv's versions; nothing is downloaded twice); bench-gpu is the check itself, which the device runs through
# benchmarks/gpu_run.sh (BENCH_GPU_ARGS=--cpu-tiny runs it here, on tiny teachers, in seconds).
prepare-gpu: $(STAMP)
	$(BIN)/python benchmarks/prepare_gpu.py --dest .whl

bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/bench_gpu.py $(BENCH_GPU_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check attncache cli tests benchmarks

clean:
	rm -rf $(DEMO_OUT) .pytest_cache

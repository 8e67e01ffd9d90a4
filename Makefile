# rangerdl: `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel this machine carries; plain `torch` would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.setup-stamp
# torchft (benchmarks/peers: DiLoCo as a time-to-quality contender) asks for any torch >= 2.7 and
# pip would swap ours for a CUDA build: install it without dependencies, then its runtime ones.
TORCHFT_PIN ?= torchft==0.2.0
TORCHFT_DEPS := opentelemetry-api opentelemetry-sdk opentelemetry-exporter-otlp-proto-http
FT_STAMP := $(VENV)/.torchft-stamp

.PHONY: setup bench-peers demo test test-keras lint bench bench-ttq clean

setup: $(STAMP) $(FT_STAMP)

# The benchmark's outside contenders (torchft's DiLoCo and Streaming DiLoCo).
bench-peers: $(FT_STAMP)

# Rebuilt only when pyproject.toml changes, so a second `make setup` is instant.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --disable-pip-version-check -q $(TORCH_PIN)
	$(PY) -m pip install --disable-pip-version-check -q -e ".[dev]"
	@touch $@

# Whatever torch is installed (ours, or a user's own GPU build) must be the one left after it.
$(FT_STAMP): $(STAMP)
	@before=$$($(PY) -c "import torch; print(torch.__version__)") && \
	$(PY) -m pip install --disable-pip-version-check -q --no-deps $(TORCHFT_PIN) && \
	$(PY) -m pip install --disable-pip-version-check -q $(TORCHFT_DEPS) && \
	after=$$($(PY) -c "import torch, torchft; print(torch.__version__)") && \
	{ test "$$before" = "$$after" || { echo "installing torchft replaced torch $$before by $$after"; exit 1; }; }
	@touch $@

demo: setup
	$(PY) -m rangerdl train

lint: setup
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples
	$(PY) -m mypy

# The main run covers tests/keras_backends on the PyTorch backend; Keras picks its backend at
# import, so TensorFlow and JAX each get a process of their own, side by side (each mostly
# single-threaded), each with its own temporary folder; their logs are printed when both end.
KERAS_BACKENDS := tensorflow jax
# pytest-xdist: the suite is mostly processes that start, wait for each other and stop; two
# workers keep both cores busy (worksteal: a worker that runs out takes the other's queued
# tests). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
# The lint and the Keras backends run beside pytest at the lowest priority (nice 19): they take
# the CPU its workers leave idle while they wait on the processes they start (about a quarter of
# it), not CPU from them. Their logs are printed after pytest's.
test: setup
	@for t in lint test-keras; do \
	  (nice -n 19 $(MAKE) --no-print-directory $$t > $(VENV)/$$t.log 2>&1; echo $$? > $(VENV)/$$t.rc) & \
	done; \
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15; status=$$?; wait; \
	for t in lint test-keras; do \
	  echo "== make $$t"; cat $(VENV)/$$t.log; test "$$(cat $(VENV)/$$t.rc)" = 0 || status=1; \
	done; exit $$status

test-keras: setup
	@for b in $(KERAS_BACKENDS); do \
	  (KERAS_BACKEND=$$b $(PY) -m pytest -q -p no:cacheprovider --basetemp=$(VENV)/pytest-keras-$$b \
	    tests/keras_backends > $(VENV)/keras-$$b.log 2>&1; echo $$? > $(VENV)/keras-$$b.rc) & \
	done; wait; status=0; \
	for b in $(KERAS_BACKENDS); do \
	  echo "== tests/keras_backends on $$b"; cat $(VENV)/keras-$$b.log; \
	  test "$$(cat $(VENV)/keras-$$b.rc)" = 0 || status=1; \
	done; exit $$status

bench: setup
	bash benchmarks/run_all.sh

# The time-to-quality protocol from scratch for TTQ_CELLS (default the headline cell): the tuning
# its contenders need, then the cell, then the docs' tables. Needs root (netsim). Estimated ~3 h on
# 2 idle cores from the committed runs' wall times (docs/benchmarks.md). TTQ_REDO= keeps the runs
# already in the JSON and adds only what is missing.
TTQ_CELLS ?= gpt-2h-100mbit
TTQ_REDO ?= --redo
bench-ttq: setup
	$(PY) benchmarks/ttq_protocol.py tune --cells $(TTQ_CELLS) $(TTQ_REDO)
	$(PY) benchmarks/ttq_protocol.py run --cells $(TTQ_CELLS) $(TTQ_REDO)
	$(PY) benchmarks/report.py --docs

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

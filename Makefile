# One entry point for newcomers and CI. `make test` builds .venv from nothing when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DEMO_DIR ?= /tmp/t5gemma_demo

.PHONY: test test-fast demo venv clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# torch first, pinned, so no resolver step can reach for a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Test files spread over TEST_JOBS processes (pytest-xdist; a file's tests stay in one process,
# so its module fixtures are built once). CI has 2 cores.
TEST_JOBS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile tests

# The quick tier (about 3 minutes here): everything but the tests marked slow (subprocess
# trainings, multi-process runs, TPU compiles, the longest numerics checks).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# Trains a tiny T5Gemma to translate the built-in CLDR names, en->de and en->ru (CPU, ~5 minutes).
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/t5gemma train --gin_file=runs/demo.gin --gin.MODEL_DIR='"$(DEMO_DIR)"'

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

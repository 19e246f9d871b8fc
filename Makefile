# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv and install everything; torch==2.13.0 goes in first, so the project's torch range
# is already satisfied. On the project's machines pip's configuration serves that version as a local CPU
# build; elsewhere, add PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu to get the CPU wheel
# rather than PyPI's multi-GB CUDA one.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
TORCH  := torch==2.13.0
TF_KERAS := tf_keras~=2.21.0
EXTRAS := keras,torch,test,bench
export TF_CPP_MIN_LOG_LEVEL := 3
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test test-slow test-all lint bench bench-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py bridge/_kernels.c Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	# Keras 2 (tf_keras) for legacy models; --no-deps: it declares `tensorflow`, which would pull the GPU build
	$(BIN)/python -m pip install -q --no-deps $(TF_KERAS)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py --out demo-out

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/python -m pip install -q ruff mypy
	$(BIN)/ruff check .
	$(BIN)/mypy bridge converters benchmarks

bench-quick: $(STAMP)
	$(BIN)/embridge bench --quick --out bench-out

bench: $(STAMP)
	$(BIN)/embridge bench --out bench-out

clean:
	rm -rf $(VENV) demo-out bench-out .pytest_cache

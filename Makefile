# pico-vllm: `make run` and `make test` set everything up themselves (uv, the venv, OpenBLAS).
SHELL := /bin/bash
.DEFAULT_GOAL := help

# uv from PATH, else bootstrapped from PyPI into .tools/ (no installer script: registries only).
UV := $(or $(shell command -v uv 2>/dev/null),$(CURDIR)/.tools/bin/uv)

# The mlx[cpu] wheel ships reference BLAS (~3.6 GFLOP/s); Debian's OpenBLAS is ~20x faster.
OPENBLAS := /usr/lib/x86_64-linux-gnu/libopenblas.so.0
ifeq ($(shell uname -s),Linux)
ifneq ($(wildcard $(OPENBLAS)),)
export LD_PRELOAD := $(OPENBLAS)
endif
endif

PYTEST_ARGS ?=

.PHONY: help sync run test lint clean

help:
	@echo "make run    set up, then run the benchmark sandbox on the embedded default model"
	@echo "make test   set up, then run the test suite"
	@echo "make lint   ruff"
	@echo "make clean  remove the venv and caches"

$(CURDIR)/.tools/bin/uv:
	python3 -m venv $(CURDIR)/.tools
	$(CURDIR)/.tools/bin/pip install --quiet uv

sync: $(UV)
	$(UV) sync

run: sync
	$(UV) run pico-vllm bench --quick

test: sync
	$(UV) run pytest $(PYTEST_ARGS)

lint: sync
	$(UV) run ruff check pico_vllm metal_kernels tests

clean:
	rm -rf .venv .tools .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# pico-vllm: `make run` and `make test` set everything up themselves (uv, the venv, OpenBLAS).
SHELL := /bin/bash
.DEFAULT_GOAL := help

# uv from PATH, else bootstrapped from PyPI into .tools/ (no installer script: registries only).
UV := $(or $(shell command -v uv 2>/dev/null),$(CURDIR)/.tools/bin/uv)

# The mlx[cpu] wheel ships reference BLAS (~3.6 GFLOP/s); Debian's OpenBLAS is ~20x faster.
# `import pico_vllm` loads it by itself; the preload also covers processes that import MLX first
# (the tests' mlx-lm oracles, `python -m metal_kernels.bench`).
OPENBLAS := /usr/lib/x86_64-linux-gnu/libopenblas.so.0
ifeq ($(shell uname -s),Linux)
ifneq ($(wildcard $(OPENBLAS)),)
export LD_PRELOAD := $(OPENBLAS)
endif
endif

PYTEST_ARGS ?=
# Extra arguments for `jupyter lab`. As root (a container) it refuses to start without --allow-root.
NOTEBOOK_ARGS ?=
JUPYTER_AS_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: help sync run test lint clean notebooks notebooks-figures strip-notebooks

help:
	@echo "make run    set up, then run the benchmark sandbox on the embedded default model"
	@echo "make test   set up, then run the test suite"
	@echo "make lint   ruff"
	@echo "make notebooks          open the notebooks in JupyterLab (NOTEBOOK_ARGS=... for jupyter lab)"
	@echo "make notebooks-figures  run every notebook, refreshing notebooks/figures/ (outputs not kept)"
	@echo "make strip-notebooks    remove outputs from the notebooks before committing"
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
	$(UV) run ruff check pico_vllm metal_kernels tests notebooks

notebooks: sync
	$(UV) run --with jupyterlab jupyter lab $(JUPYTER_AS_ROOT) $(NOTEBOOK_ARGS) notebooks/

notebooks-figures: sync
	cd notebooks && for nb in [0-9]*.ipynb; do $(UV) run jupyter execute "$$nb" || exit 1; done

strip-notebooks: sync
	$(UV) run python notebooks/_strip.py

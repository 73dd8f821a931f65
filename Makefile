# Large Models as a Service: every target bootstraps .venv with pip when it is missing
# or older than pyproject.toml, so `make book` and `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
NBVAL := --nbval-lax --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: help book test lab execute student bench lint unit nbval book-check clean

help:
	@echo "make book     build the website into _build/html"
	@echo "make test     lint, unit tests, notebook hygiene, nbval on every notebook, strict book build"
	@echo "make lab      open JupyterLab on notebooks/"
	@echo "make execute  re-run every notebook in place, in a fresh kernel, top to bottom"
	@echo "make student  write the student edition (solutions replaced by stubs) to student/"
	@echo "make bench    run the benchmarks and write their tables to book/figures/"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python >= 3.10 is needed, found " + sys.version.split()[0])'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[all]"
	@touch $(STAMP)

book: $(STAMP)
	$(BIN)/jupyter-book build . --builder html --keep-going
	@echo "Open $(CURDIR)/_build/html/index.html in a browser."

test: lint unit nbval book-check
	@echo "make test: all checks passed."

lint: $(STAMP)
	$(BIN)/ruff check aimodels tests benchmarks book/_ext

unit: $(STAMP)
	$(BIN)/python -m pytest tests

# One notebook at a time: each kernel already uses both cores through PyTorch, and two
# kernels in parallel (pytest-xdist) oversubscribe them: measured 425 s instead of 72 s.
nbval: $(STAMP)
	$(BIN)/python -m pytest $(NBVAL) $(NOTEBOOKS)

book-check: $(STAMP)
	$(BIN)/jupyter-book build . --builder html --all --warningiserror --keep-going

# JupyterLab refuses to start as root unless told to: containers often run as root.
lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root)

execute: $(STAMP)
	$(BIN)/python benchmarks/execute_notebooks.py $(NOTEBOOKS)

# The student edition: solutions replaced by stubs, graders kept, outputs cleared.
student: $(STAMP)
	rm -rf student
	$(BIN)/python -m aimodels.editions notebooks student

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_optim.py
	$(BIN)/python benchmarks/bench_conv.py
	$(BIN)/python benchmarks/bench_kv_cache.py
	$(BIN)/python benchmarks/bench_scaling.py
	$(BIN)/python benchmarks/bench_serving.py
	$(BIN)/python benchmarks/bench_llm.py
	$(BIN)/python benchmarks/bench_compress.py
	$(BIN)/python benchmarks/bench_distributed.py
	$(BIN)/python benchmarks/bench_edge.py

clean:
	rm -rf _build .pytest_cache .ruff_cache student

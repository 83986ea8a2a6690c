# Quick start: `make demo` (the main job) and `make test` (the whole suite). Both create .venv and
# install the pinned dependencies on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PY := $(VENV)/bin/python

.PHONY: demo test lint format clean

$(STAMP): setup.py
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test,aot,lint]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m llvm_jax.main --config=configs/demo.py --workdir=workdirs/demo

test: $(STAMP)
	$(VENV)/bin/pytest -n 2 --durations=15 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pyink --check --quiet .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix --quiet .
	$(VENV)/bin/pyink --quiet .

clean:
	rm -rf $(VENV) workdirs

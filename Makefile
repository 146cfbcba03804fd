# Two entry points (README): `make quickstart` runs the main job, `make test` runs the tests.
# Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install quickstart test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/curvlt measure --example
	$(VENV)/bin/curvlt tune quickstart

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/geometry.py
	$(PY) benchmarks/training.py
	$(PY) benchmarks/sweep.py
	$(PY) benchmarks/loading.py

clean:
	rm -rf $(VENV) build *.egg-info

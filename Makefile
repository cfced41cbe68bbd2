# Everything a fresh machine needs: `make test` and `make demo`.
# torch is installed first at the pinned CPU version (a local wheel on CPU machines), so that the
# project's torch range is already satisfied and no CUDA packages are downloaded.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0


.PHONY: test lint demo bench report clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

lint: $(VENV)/.installed
	$(PY) -m ruff check .

demo: $(VENV)/.installed
	$(VENV)/bin/caad run --config configs/demo.yaml

bench: $(VENV)/.installed
	$(PY) -m pytest bench/ --benchmark-json=bench/results/cpu.json
	$(PY) -m bench.report bench/results/cpu.json

clean:
	rm -rf $(VENV) build *.egg-info

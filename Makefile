# Everything a fresh machine needs: `make test` and `make demo`.
# torch is installed first at the pinned CPU version (a local wheel on CPU machines), so that the
# project's torch range is already satisfied and no CUDA packages are downloaded.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0


.PHONY: test lint demo experiment experiment-crossmodal bench report clean gpu-check

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

# The full CAAD experiment (arms x seeds; results under the folder configs/experiment.yaml names).
# --resume: a new folder is created, an interrupted one continues, finished arms are skipped.
experiment: $(VENV)/.installed
	$(VENV)/bin/caad experiment --config configs/experiment.yaml --resume

# The text-teacher methods' forgetting and modality-gap table (cross-modal channels, source-wise, layer-wise)
# over seeds on the built-in spoken-QA set; results under the folder configs/experiment_crossmodal.yaml names.
experiment-crossmodal: $(VENV)/.installed
	$(VENV)/bin/caad experiment --config configs/experiment_crossmodal.yaml --resume

bench: $(VENV)/.installed
	$(PY) -m pytest bench/ --benchmark-json=bench/results/cpu.json
	$(PY) -m bench.report bench/results/cpu.json

# The prepared GPU check (bench/gpu_check.py; how to run it on the device tool: its docstring and
# bench/README.md). It needs no virtualenv: on a GPU image without .venv it runs the image's python3.
# On a CPU: `make gpu-check GPU_CHECK_ARGS=--dry-run`.
GPU_CHECK_PY ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
GPU_CHECK_ARGS ?=
gpu-check:
	$(GPU_CHECK_PY) -m bench.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

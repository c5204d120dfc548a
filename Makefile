# Fresh machine to running pipeline in one command. torch is installed first and pinned so pip takes
# the local CPU build instead of pulling a multi-GB CUDA build (override TORCH=... on GPU nodes).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
OUT    ?= runs/digits-quick
PYTEST_ARGS ?=

.PHONY: setup demo test test-all bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/raydistill run --config configs/digits/pipeline.yaml --preset quick --out $(OUT)

test: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/pairs_throughput.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/train_overhead.py
	$(BIN)/python benchmarks/dmd_step.py
	$(BIN)/python benchmarks/checkpoint_cost.py
	$(BIN)/python benchmarks/memory_levers.py
	$(BIN)/python benchmarks/gpu_scale.py

lint: setup
	$(BIN)/ruff check raydistill tests jobs benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache

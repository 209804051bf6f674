# Quick start: `make demo` (set up and run the main job), `make test` (set up and run the tests).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# Install the pinned CPU torch first, only when no torch is present, so the package's
	@# torch range is already satisfied and never resolves to a multi-GB CUDA build.
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/pip install --quiet -e ".[eval,test]"
	@touch $(STAMP)

demo: setup
	$(BIN)/flowmaps demo --out runs/demo-$$(date +%Y%m%d-%H%M%S)

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs

# Benchmarks (not tests; minutes to an hour on 2 cores). Each prints ratios measured in one run.
.PHONY: bench-quality bench-cost bench-peers bench-images bench-memory
bench-quality: setup
	$(BIN)/python benchmarks/quality_vs_cost.py

bench-cost: setup
	$(BIN)/python benchmarks/training_cost.py

bench-peers: setup
	$(BIN)/pip install --quiet --no-deps torchcfm==1.0.7 flow-matching==1.0.10
	$(BIN)/python benchmarks/peers.py

bench-images: setup
	$(BIN)/python benchmarks/images_digits.py

bench-memory: setup
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/image_memory.py

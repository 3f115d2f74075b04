# rflow_jax — one-command entry points. `make train` and `make test` create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/quickstart
CONFIG ?= configs/quickstart.py
PYTEST_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: train test test-fast sample install freeze bench format device-wheels clean

# torch goes in first and alone: torch==2.13.0 is a local CPU wheel, while anything that pulls torch unpinned
# downloads a multi-GB CUDA build. The rest is pinned exactly by constraints.txt.
$(STAMP): setup.cfg constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $@

# The native CPU library: attention_impl=native's kernel (rflow_jax/model/native_attention.py) and
# optim.update_impl=native's fused update (rflow_jax/train/native_update.py), rebuilt when a source changes. Built
# with -march=native for this machine. A failed build (no g++) prints one line and leaves install successful: the
# runtime then falls back (attention_impl=blocked, the optax update) with a warning.
NATIVE_LIB := rflow_jax/model/native/native_cpu.so
install: $(STAMP) $(NATIVE_LIB)

$(NATIVE_LIB): $(wildcard rflow_jax/model/native/*.cc rflow_jax/model/native/*.h) | $(STAMP)
	$(BIN)/python -m rflow_jax.model.native_attention || true

# Trains the quickstart config into $(WORKDIR); re-running resumes from the last checkpoint there.
train: install
	$(BIN)/python -m rflow_jax.main --config=$(CONFIG) --workdir=$(WORKDIR)

# Full suite, slow end-to-end tests included (that is what CI runs). Two xdist workers: much of the suite is
# single-threaded compilation and subprocess start-up, so two workers keep both cores busy (~15 min on 2 cores;
# docs/results/performance.md §5).
test: install
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

# While iterating: skip the slow end-to-end tests.
test-fast: install
	$(BIN)/python -m pytest -q -n 2 -m "not slow" $(PYTEST_ARGS)

sample: install
	$(BIN)/python -m rflow_jax.sample --workdir=$(WORKDIR) --prompts=configs/prompts/shapes_eval.txt --out=$(WORKDIR)/samples_cli

# The one formatter configuration (pyproject.toml [tool.pyink]: Google style, 2-space indents, 120 columns).
FORMATTED := rflow_jax configs launch benchmarks tests conftest.py
format: $(STAMP)
	$(BIN)/pyink $(FORMATTED)

bench: install
	$(BIN)/python benchmarks/train_step.py

# Wheels for launch/device_shapes.sh and launch/device_perf.sh: what the lent GPU machine (Python 3.12, JAX, torch
# and their kin preinstalled, no network) lacks, and the JAX libraries whose behaviour the tests pin (flax, optax,
# orbax, chex), at this project's pins, into .whl/ (git-ignored; the device call carries it).
DEVICE_WHEELS := grain array_record ml_collections clu portpicker diffusers flax optax orbax-checkpoint chex
device-wheels: $(STAMP)
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl \
	  $$(for p in $(DEVICE_WHEELS); do grep -i "^$$p==" constraints.txt; done)

# Re-pin after changing setup.cfg: installs the ranges fresh and writes the resolved versions.
freeze: $(STAMP)
	(echo "# Exact pins the Makefile installs with (pip -c). Regenerate with 'make freeze' after changing setup.cfg."; \
	 echo "# torch is installed first and alone (torch==2.13.0, the local CPU wheel): see the Makefile."; \
	 $(BIN)/pip freeze --exclude-editable | grep -v '^torch==') > constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache

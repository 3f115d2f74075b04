# rflow_jax — one-command entry points. `make train` and `make test` create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/quickstart
CONFIG ?= configs/quickstart.py
PYTEST_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: train test test-fast sample install freeze bench clean

# torch goes in first and alone: torch==2.13.0 is a local CPU wheel, while anything that pulls torch unpinned
# downloads a multi-GB CUDA build. The rest is pinned exactly by constraints.txt.
$(STAMP): setup.cfg constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $@

install: $(STAMP)

# Trains the quickstart config into $(WORKDIR); re-running resumes from the last checkpoint there.
train: $(STAMP)
	$(BIN)/python -m rflow_jax.main --config=$(CONFIG) --workdir=$(WORKDIR)

# Full suite, slow end-to-end tests included (that is what CI runs). Two xdist workers: much of the suite is
# single-threaded compilation and subprocess start-up, so two workers on two cores take ~11 min instead of ~18.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

# While iterating: skip the slow end-to-end tests.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not slow" $(PYTEST_ARGS)

sample: $(STAMP)
	$(BIN)/python -m rflow_jax.sample --workdir=$(WORKDIR) --prompts=configs/prompts/shapes_eval.txt --out=$(WORKDIR)/samples_cli

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py

# Re-pin after changing setup.cfg: installs the ranges fresh and writes the resolved versions.
freeze: $(STAMP)
	(echo "# Exact pins the Makefile installs with (pip -c). Regenerate with 'make freeze' after changing setup.cfg."; \
	 echo "# torch is installed first and alone (torch==2.13.0, the local CPU wheel): see the Makefile."; \
	 $(BIN)/pip freeze --exclude-editable | grep -v '^torch==') > constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache

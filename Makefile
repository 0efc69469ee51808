# `make train`: set up .venv (first time) and train configs/quickstart.yaml on NPROC CPU/GPU processes.
# `make test`: set up .venv (first time) and run the test suite (what CI runs).
# `make test-fast`: the unit tier and the multi-process tests not marked slow (tiers: docs/tests.md; < 3 min).
VENV ?= .venv
PY := $(VENV)/bin/python
NPROC ?= 2
CONFIG ?= configs/quickstart.yaml

.PHONY: train test test-fast lint setup clean

$(VENV)/.installed: pyproject.toml constraints.txt scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)
	touch $@

setup: $(VENV)/.installed

train: $(VENV)/.installed
	$(VENV)/bin/torchrun --nproc_per_node $(NPROC) train.py --config $(CONFIG) $(ARGS)

# ruff (lint, import order) on everything; mypy on parallel/, modeling/, training/ (pyproject.toml).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=25 tests $(PYTEST_ARGS)

FAST := unit or (multiprocess and not slow)

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "$(FAST)" tests $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache

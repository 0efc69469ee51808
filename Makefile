# `make train`: set up .venv (first time) and train configs/quickstart.yaml on NPROC CPU/GPU processes.
# `make test`: set up .venv (first time) and run the test suite (what CI runs).
# `make test-fast`: the unit and single-process tests plus small multi-process parity checks (~2.5 min).
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

FAST_TESTS := test_config test_imports test_pipeline_schedules test_checkpoint_pieces test_hf_files \
	test_safe_loading test_strict_device test_flight test_bench_cpu_adam test_materialize test_zero_parity \
	test_reference_independence

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q $(FAST_TESTS:%=tests/%.py) $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache

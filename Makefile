# `make train`: set up .venv (first time) and train configs/quickstart.yaml on NPROC CPU/GPU processes.
# `make test`: set up .venv (first time) and run the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
NPROC ?= 2
CONFIG ?= configs/quickstart.yaml

.PHONY: train test setup clean

$(VENV)/.installed: pyproject.toml constraints.txt scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)
	touch $@

setup: $(VENV)/.installed

train: $(VENV)/.installed
	$(VENV)/bin/torchrun --nproc_per_node $(NPROC) train.py --config $(CONFIG) $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache

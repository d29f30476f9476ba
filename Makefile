# Two commands for a fresh machine: `make demo` (the main job) and `make test`.
# Each creates or reuses the virtualenv in $(VENV).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A pinned torch resolves to the CPU wheel here; a looser spec pulls GBs of CUDA packages.
# It is installed before the test extra so the extra never replaces it.
TORCH ?= torch==2.13.0

.PHONY: demo test notebooks clean

$(VENV)/.ptjax-base: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.ptjax-test: $(VENV)/.ptjax-base
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.ptjax-base
	$(BIN)/ptjax sweep experiments/demo.yaml

test: $(VENV)/.ptjax-test
	$(BIN)/python -m pytest -q

# The analysis notebooks, executed against the demo sweep's output (after `make demo`).
notebooks: $(VENV)/.ptjax-test
	$(BIN)/python notebooks/execute.py runs/demo

clean:
	rm -rf $(VENV) runs

# Two commands for a fresh machine: `make demo` (the main job) and `make test`.
# Each creates or reuses the virtualenv in $(VENV); other targets add an extra to it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A pinned torch resolves to the CPU wheel here; a looser spec pulls GBs of CUDA packages.
# It is installed before the test extra so the extra never replaces it.
TORCH ?= torch==2.13.0

.PHONY: demo test test-slow test-targets notebooks lab lab-smoke docs docs-serve lint readme check-docs clean

# The demo's install: no TensorFlow, no torch (docs/install.md quotes its size).
# Editable installs are -qq: setuptools' editable build prints an 11-line banner ("Please
# be careful with folders in your working directory...") as a warning, which -q shows;
# -qq shows pip's errors only, so a failed install still says why.
$(VENV)/.ptjax-base: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -qq -e .
	touch $@

$(VENV)/.ptjax-test: $(VENV)/.ptjax-base
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -qq -e ".[test]"
	touch $@

$(VENV)/.ptjax-%: $(VENV)/.ptjax-base
	$(BIN)/pip install -qq -e ".[$*]"
	touch $@

demo: $(VENV)/.ptjax-base
	$(BIN)/ptjax sweep experiments/demo.yaml

# The suite, under 10 minutes on 2 cores; the slow tests (SIGKILL resume for every method,
# multi-process and mesh runs, pre-training, the GPU suite's dry run) are `make test-slow`,
# which CI runs too. Tests run in parallel, one worker per core up to PYTEST_WORKERS: XLA
# compiles a tiny model's step on one thread, so one process leaves a core idle. Each runs
# on one CPU device, then the `mesh` tests in a second session on eight (tests/conftest.py).
PYTEST_WORKERS ?= 4
PYTEST := $(BIN)/python -m pytest -q -n auto --maxprocesses $(PYTEST_WORKERS)
test: $(VENV)/.ptjax-test
	$(PYTEST) -m "not slow and not targets and not mesh"
	PTJAX_TEST_DEVICES=8 $(PYTEST) -m "not slow and not targets and mesh"

test-slow: $(VENV)/.ptjax-test
	$(PYTEST) -m "slow and not targets and not mesh"
	PTJAX_TEST_DEVICES=8 $(PYTEST) -m "slow and not targets and mesh"

# The compile matrix (tests/test_targets.py): every method and attention path compiled for
# an H100 and a TPU v5e, one chip and several, on this CPU. Its own venv: the CUDA plugin
# of the targets extra must not load where a run should start on the CPU.
TVENV ?= .venv-targets
$(TVENV)/.ptjax-targets: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(TVENV)
	$(TVENV)/bin/pip install -q --upgrade pip
	$(TVENV)/bin/pip install -qq -e ".[targets]"
	touch $@

test-targets: $(TVENV)/.ptjax-targets
	JAX_PLATFORMS=cpu $(TVENV)/bin/python -m pytest -q -p no:cacheprovider -m targets \
		-n auto --maxprocesses $(PYTEST_WORKERS) tests/test_targets.py tests/test_predict.py

# The analysis notebooks, executed against the demo sweep's output (after `make demo`).
notebooks: $(VENV)/.ptjax-test
	$(BIN)/python notebooks/execute.py runs/demo

# JupyterLab on the notebooks, reading the demo's sweep (PTJAX_SWEEP_DIR for another).
lab: $(VENV)/.ptjax-notebooks
	PTJAX_SWEEP_DIR=$${PTJAX_SWEEP_DIR:-$(CURDIR)/runs/demo} $(BIN)/jupyter lab notebooks/

# The pre-training lab in miniature (experiments/lab/README.md): the smallest size, a few
# steps, both objectives, two sweeps; the whole lab is `python experiments/lab/lab.py all`.
lab-smoke: $(VENV)/.ptjax-lab
	rm -rf runs/lab-smoke
	$(BIN)/python experiments/lab/lab.py all --smoke

# The documentation site (mkdocs, Material theme): site/, or served at localhost:8000.
docs: $(VENV)/.ptjax-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: $(VENV)/.ptjax-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

lint: $(VENV)/.ptjax-lint
	$(BIN)/ruff check .

# README.md's demo results, regenerated from runs/demo (after `make demo`).
readme: $(VENV)/.ptjax-base
	$(BIN)/python tools/docgen.py readme runs/demo

# Generated docs are current: the config reference and README's demo results.
check-docs: $(VENV)/.ptjax-base
	$(BIN)/python tools/docgen.py config --check
	$(BIN)/python tools/docgen.py readme runs/demo --check

clean:
	rm -rf $(VENV) runs site

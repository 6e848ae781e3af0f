# megalign: `make demo` and `make test` work on a fresh machine (they create .venv and install what they need).
#   make demo    end-to-end demo on the shipped sample (CPU, a few minutes)
#   make test    lint, format and type checks, then the test suite (CI runs this through .ci/run)
#   make test-slow  the slow tier (the full parallel layout grid)
#   make bench   benchmarks against their named baselines (figures go to docs/performance.md)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.megalign-installed
PYTEST_ARGS ?=

.PHONY: demo test lint test-slow bench install clean

install: $(STAMP)

# A venv that sees the system's packages when the system Python already has torch >= 2.6 (megalign's
# floor, MIN_TORCH; GPU users keep their CUDA build); otherwise an isolated venv with the CPU build torch==2.13.0.
TORCH_OK = import sys, torch; sys.exit(tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]) < (2, 6))
$(STAMP): setup.py pyproject.toml csrc/helpers.cpp $(wildcard csrc/dataset_index/*.h) $(wildcard csrc/bpe/*.h)
	@if [ ! -x "$(PY)" ]; then \
	  if $(PYTHON) -c "$(TORCH_OK)" >/dev/null 2>&1; then \
	    echo "[make] system torch >= 2.6 found: creating $(VENV) with --system-site-packages"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel pybind11
	@$(PY) -c "$(TORCH_OK)" >/dev/null 2>&1 || { echo "[make] no torch >= 2.6 importable: installing torch==2.13.0"; \
	  $(PY) -m pip install --quiet torch==2.13.0; }
	$(PY) -m pip install --quiet --no-build-isolation -e ".[dev,hf,report]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/megalign demo --workdir demo_output

# Lint, format and type checks over megalign/ (configured in pyproject.toml), then the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check megalign
	$(VENV)/bin/ruff format --check megalign
	$(VENV)/bin/mypy

test: lint
	@set -o pipefail; $(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "[make] pytest collected no tests: failing"; exit 1; fi; exit $$rc

# The heavy tier: the full TP x PP x DP layout grid (42 layouts, about 8 minutes here) and other slow tests.
test-slow: $(STAMP)
	MEGALIGN_SLOW=1 $(PY) -m pytest -q -m slow $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf build demo_output megalign/_helpers*.so *.egg-info

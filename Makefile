# Newcomer commands: `make demo` and `make test`. Both run `make setup` first when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.setup-done

.PHONY: setup test test-fast test-kernels demo lint bench docs-check clean-workspace

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	$(PIP) install -e '.[test]'
	$(PY) -m models.fetch_weights
	touch $(STAMP)

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# The developer tier: no slow, Prefect-flow or browser tests.
test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow and not flows and not browser"

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/fiqa demo

# The cheap docs figures recomputed and compared with the docs (docs/figures.md); about 1 min on 2 cores.
docs-check: setup
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.docs_figures --failures-only

lint: setup
	$(VENV)/bin/ruff check pipeline models flows data_manifest tests benchmarks

clean-workspace:
	rm -rf workspace

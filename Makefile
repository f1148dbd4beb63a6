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

# The numerically sensitive tests three ways: generic kernels with OpenCV's optimised paths off, then 1 and 2
# threads (torch and OpenCV). A green run says their tolerances do not lean on one CPU's kernels.
KERNEL_TESTS := tests/models/test_expression.py tests/flows/test_anchors_flow.py tests/pipeline/test_anchors.py \
	tests/benchmarks/test_bench_anchors.py tests/models/test_occlusion.py tests/pipeline/test_blur.py \
	tests/pipeline/test_lighting.py tests/models/test_pose.py tests/pipeline/test_validity.py \
	tests/pipeline/test_align.py tests/models/test_attributes.py tests/models/test_fast_forward.py \
	tests/models/test_cascade_kernel.py
KERNEL_RUN := $(PY) -c "import os, sys, cv2, pytest, torch; cv2.setUseOptimized(os.environ['CV_OPT'] == '1'); \
	n = int(os.environ.get('NT', '0')); n and (torch.set_num_threads(n), cv2.setNumThreads(n)); \
	print('OpenCV optimised:', cv2.useOptimized(), 'torch threads:', torch.get_num_threads(), \
	'kernels:', torch.backends.cpu.get_cpu_capability()); sys.exit(pytest.main(['-q', *sys.argv[1:]]))"
test-kernels: setup
	HF_HUB_OFFLINE=1 ATEN_CPU_CAPABILITY=default CV_OPT=0 $(KERNEL_RUN) $(KERNEL_TESTS)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 CV_OPT=1 NT=1 $(KERNEL_RUN) $(KERNEL_TESTS)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 CV_OPT=1 NT=2 $(KERNEL_RUN) $(KERNEL_TESTS)

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/fiqa demo

# The cheap docs figures recomputed and compared with the docs (docs/figures.md); about 1 min on 2 cores.
docs-check: setup
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.docs_figures --failures-only

lint: setup
	$(VENV)/bin/ruff check pipeline models flows data_manifest tests benchmarks

clean-workspace:
	rm -rf workspace

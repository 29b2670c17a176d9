# One-command setup. `make test` and `make demo` build the environment first if it is missing.
PYTHON_BASE ?= python3.11
VENV        ?= .venv
PY          := $(VENV)/bin/python
WHEEL_CACHE ?= $(HOME)/.cache/dsa-backbones/wheels

# Exact pins for the development environment (setup.cfg keeps ranges wide).
TORCH_PINS  := torch==2.14.1 torchvision==0.29.1
PINS        := timm==1.0.29 mmengine==0.10.7 mmcv==2.1.0 mmdet==3.3.0 spconv==2.3.8 \
               torch-pruning==1.6.0 onnx onnxruntime onnxscript pycocotools pytest pytest-timeout

ENV_STAMP   := $(VENV)/.env-complete

.PHONY: env test test-fast demo clean-env

env: $(ENV_STAMP)

$(VENV)/.torch-installed:
	$(PYTHON_BASE) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# setuptools < 81 still ships pkg_resources, which mmcv's setup.py imports.
	$(PY) -m pip install --quiet $(TORCH_PINS) "setuptools<81" wheel ninja
	touch $@

$(ENV_STAMP): $(VENV)/.torch-installed setup.cfg Makefile tools/build_mmcv.sh
	bash tools/build_mmcv.sh $(PY) $(WHEEL_CACHE) 2.1.0
	$(PY) -m pip install --quiet --find-links $(WHEEL_CACHE) $(TORCH_PINS) $(PINS) \
		-e ".[mm,points,compress,export,dev]"
	$(PY) -c "import mmcv.ops, mmdet.models, ops, backbones; print('environment ready')"
	touch $@

# Whole suite (kernels run on the CPU through the Triton interpreter; `gpu` tests skip).
test: env
	$(PY) -m pytest tests

demo: env
	$(PY) tools/demo.py

clean-env:
	rm -rf $(VENV)

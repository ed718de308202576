#!/usr/bin/env bash
# GPU verification of the native op, for a lent H100/H200 (the `device` tool) or any CUDA machine.
#
#   bash benchmarks/gpu_check.sh            # from the repository root; results under $OUT
#
# 1. records the machine (nvidia-smi, nvcc, torch) in env.txt;
# 2. builds the extension there with its CUDA kernels (TORCH_CUDA_ARCH_LIST, default 9.0 = Hopper):
#    `python setup.py build_ext --inplace` -> rpo/_C.so, and checks that the CUDA kernel is registered;
# 3. runs tests/test_ops_cuda.py (values and gradients vs the float64 reference, opcheck, gradcheck, bf16
#    tolerances, torch.compile, streams, memory at M = N = 16384) -> test_ops_cuda.log / .xml;
# 4. runs the op benchmark on CUDA (benchmarks/contrast_loss.py --device cuda) for M = N up to 65536, one size
#    per call while time is left -> contrast_loss_cuda.json (merged) and .log;
# 5. a diagnostic: the op's float32 error vs float64 with torch's float32 matmul precision "highest" (default)
#    and "high" (TF32 cosines) -> diagnostics.json;
# and writes summary.txt (one line per stage: exit status, seconds). Within 8 minutes in total: every stage has a
# time limit and the benchmark skips sizes that no longer fit. Needs only torch, pytest, setuptools and ninja
# (no megatron-core, datasets or network). At most 8 files are written (the device tool returns no more).
set -u -o pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
SIZES=${GPU_CHECK_SIZES:-"512 2048 4096 8192 16384 32768 65536"}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
START=$(date +%s)
: > "$OUT/summary.txt"

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET_S - $(elapsed) )); }
note() { echo "$*" | tee -a "$OUT/summary.txt"; }

# stage NAME LIMIT_S LOG COMMAND...: runs with a time limit, appends its status to summary.txt.
stage() {
  local name=$1 limit=$2 log=$3; shift 3
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  note "$name: exit $rc in $(( $(date +%s) - t0 )) s (limit ${limit} s)"
  return $rc
}

# ---- 1. machine ------------------------------------------------------------------------------------------------
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  command -v nvcc && nvcc --version 2>&1 | tail -2
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else None); print('cpu threads', torch.get_num_threads())"
  "$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|pytest|ninja|setuptools|triton) "
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# setup.py takes CUDA_HOME, else /usr/local/cuda; a wrapper nvcc elsewhere would make cpp_extension guess wrong.
if [ -z "${CUDA_HOME:-}" ]; then
  for candidate in /usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-13 \
                   "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /nonexistent)")")")"; do
    if [ -x "$candidate/bin/nvcc" ] && [ -f "$candidate/include/cuda_runtime.h" ]; then
      export CUDA_HOME=$candidate
      break
    fi
  done
fi
note "CUDA_HOME=${CUDA_HOME:-<not found>} TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"

# ---- 2. build --------------------------------------------------------------------------------------------------
rm -f rpo/_C*.so
stage build 240 "$OUT/build.log" "$PY" setup.py build_ext --inplace
stage cuda-kernel-registered 60 "$OUT/build.log" "$PY" -c "
import torch, rpo.ops
assert rpo.ops.extension_available(), 'rpo._C did not load'
assert torch._C._dispatch_has_kernel_for_dispatch_key('rpo::contrast_loss_terms', 'CUDA'), 'no CUDA kernel in rpo._C'
print('rpo._C with CUDA kernel:', __import__('rpo._C').__file__)
" || { note "build failed: see build.log"; exit 1; }

# ---- 3. CUDA tests ---------------------------------------------------------------------------------------------
stage test_ops_cuda "$(( $(left) > 200 ? 200 : $(left) ))" "$OUT/test_ops_cuda.log" \
  "$PY" -m pytest -q -p no:cacheprovider tests/test_ops_cuda.py --junitxml="$OUT/test_ops_cuda.xml"
tail -3 "$OUT/test_ops_cuda.log" | tee -a "$OUT/summary.txt"

# ---- 4. CUDA op benchmark, one size per call while time is left ------------------------------------------------
mkdir -p "$OUT/sizes"
for size in $SIZES; do
  remaining=$(left)
  if [ "$remaining" -lt 45 ]; then
    note "benchmark M=N=$size skipped: ${remaining} s left"
    continue
  fi
  stage "benchmark M=N=$size" "$(( remaining - 30 ))" "$OUT/contrast_loss_cuda.log" \
    "$PY" benchmarks/contrast_loss.py --device cuda --sizes "$size" --min-time 0.5 --max-repeats 10 \
    --output "$OUT/sizes/$size.json"
done
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
parts = sorted((out / "sizes").glob("*.json"), key=lambda p: int(p.stem))
if parts:
    merged = json.loads(parts[0].read_text())
    merged["rows"] = [row for p in parts for row in json.loads(p.read_text())["rows"]]
    merged.pop("table", None)
    (out / "contrast_loss_cuda.json").write_text(json.dumps(merged, indent=2) + "\n")
    for p in parts:
        p.unlink()
    for row in merged["rows"]:
        op, eager = row["op"], row["eager"]
        print(row["size"], "op", op.get("time_ms", op.get("error")), "ms", op.get("peak_extra_mib"), "MiB | eager",
              eager.get("time_ms", eager.get("error")), "ms", eager.get("peak_extra_mib"), "MiB")
(out / "sizes").rmdir()
EOF

# ---- 5. diagnostic: float32 matmul precision of the embedding cosines -----------------------------------------
if [ "$(left)" -gt 20 ]; then
  stage diagnostics "$(( $(left) - 5 ))" "$OUT/summary.txt" "$PY" - "$OUT/diagnostics.json" <<'EOF'
import json, sys
import torch
from rpo.ops import contrast_loss_terms
n, dim = 4096, 384
gen = torch.Generator(device="cuda").manual_seed(0)
a, b = torch.randn(n, device="cuda", generator=gen), torch.randn(n, device="cuda", generator=gen)
shared = torch.randn(1, dim, device="cuda", generator=gen)
e = shared + torch.randn(n, dim, device="cuda", generator=gen)
f = shared + torch.randn(n, dim, device="cuda", generator=gen)
kw = dict(beta=0.5, margin=0.0, tau=0.5, alpha=0.8, weighting="embedding", weight_normalization="row",
          loss_scale=1.0 / n**2)
ref = contrast_loss_terms(a.double(), b.double(), e.double(), f.double(), **kw)
result = {"M=N": n, "D": dim}
for precision in ("highest", "high"):
    torch.set_float32_matmul_precision(precision)
    got = contrast_loss_terms(a, b, e, f, **kw)
    result[precision] = {name: ((x.double() - y).abs().max() / y.abs().max()).item()
                         for name, x, y in zip(("loss", "grad_chosen", "grad_rejected"), got, ref)}
torch.set_float32_matmul_precision("highest")
print("float32 relative error vs float64 (max over elements):", json.dumps(result))
open(sys.argv[1], "w").write(json.dumps(result, indent=2) + "\n")
EOF
fi

note "total: $(elapsed) s; files: $(ls "$OUT" | tr '\n' ' ')"

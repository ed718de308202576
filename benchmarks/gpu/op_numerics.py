"""GPU check, stage "op_numerics": the op's float32 error against float64, and its result with TF32 enabled
globally against TF32 disabled (the cosines are computed in full float32 whatever the process's TF32 setting).

    python benchmarks/gpu/op_numerics.py RESULT.json          # run by benchmarks/gpu_check.sh

M = N = 4096, D = 384, embedding weighting, both normalisations (dry run: 64, D = 16, on the CPU).
Passes when the float32 loss and gradients are within 1e-5 relative of float64 (max abs error / max abs value)
and TF32 changes them by at most 1e-6 relative.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_common as cc  # noqa: E402

import torch  # noqa: E402

FLOAT32_RTOL = 1e-5
TF32_RTOL = 1e-6
OUTPUTS = ("loss", "grad_chosen", "grad_rejected")


def inputs(size: int, dim: int, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(size, generator=generator), torch.randn(size, generator=generator)
    shared = torch.randn(1, dim, generator=generator)  # related prompts: cosines well away from 0
    e = shared + torch.randn(size, dim, generator=generator)
    f = shared + torch.randn(size, dim, generator=generator)
    return [t.to(device=cc.device(), dtype=dtype) for t in (chosen, rejected, e, f)]


def evaluate(tensors, normalization: str, size: int):
    from rpo.ops import contrast_loss_and_grads

    return contrast_loss_and_grads(*tensors, beta=0.5, margin=0.0, tau=0.5, alpha=0.8, weighting="embedding",
                                   weight_normalization=normalization, loss_scale=1.0 / size**2)


def relative_errors(got, reference) -> dict:
    return {name: ((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-300)).item()
            for name, x, y in zip(OUTPUTS, got, reference)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", type=Path)
    args = parser.parse_args(argv)
    import rpo.ops

    result = cc.StageResult(args.result, "op_numerics")
    size, dim = (64, 16) if cc.dry_run() else (4096, 384)
    result.data.update(size=size, dim=dim, extension=rpo.ops.extension_available())
    key = "CUDA" if torch.cuda.is_available() else "CPU"
    result.data["native_kernel"] = torch._C._dispatch_has_kernel_for_dispatch_key(
        "rpo::contrast_loss_and_grads", key)
    for normalization in ("row", "mean"):
        reference = evaluate(inputs(size, dim, torch.float64), normalization, size)
        float32 = inputs(size, dim, torch.float32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        exact = evaluate(float32, normalization, size)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        try:
            with_tf32 = evaluate(float32, normalization, size)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.set_float32_matmul_precision("highest")
        error, tf32_change = relative_errors(exact, reference), relative_errors(with_tf32, exact)
        ok = max(error.values()) <= FLOAT32_RTOL and max(tf32_change.values()) <= TF32_RTOL
        result.case(f"weight_normalization={normalization}", "passed" if ok else "failed",
                    float32_vs_float64=error, tf32_vs_no_tf32=tf32_change, float32_rtol=FLOAT32_RTOL,
                    tf32_rtol=TF32_RTOL)
    if not result.data["native_kernel"] or not result.data["extension"]:
        result.case("native kernel", "failed", error=f"no {key} kernel of rpo::contrast_loss_and_grads")
    return result.exit_code()


if __name__ == "__main__":
    sys.exit(main())

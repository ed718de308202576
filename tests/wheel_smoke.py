"""Smoke test of an installed rpo wheel, run by tests/test_wheel.py (and `make wheel-check-full`) with the
interpreter of a fresh virtual environment, from a directory outside the checkout (`python -I`, so neither the
script's folder nor the working directory is importable).

Checks: rpo and its compiled op come from that environment; the op on CPU matches a float64 formula written here
(loss and gradients, "embedding" and "uniform" weightings); losses are built by name from the registry and DPO
matches its closed form; the wheel's metadata pins the torch it runs with; every subpackage imports (so the
declared dependencies are complete). Prints one JSON line with the numbers;
exits 1 if a check fails.
"""
import importlib.metadata
import json
import math
import sys
from pathlib import Path

import torch


def inside(path, root) -> bool:
    return Path(root).resolve() in Path(path).resolve().parents


def formula_loss(a, b, weights, beta):
    """−1/(M·N) Σ_ij log σ(ω_ij β (a_i − b_j)) in float64."""
    s = weights * beta * (a[:, None] - b[None, :])
    return torch.nn.functional.softplus(-s).mean()


def check_op(results, failures):
    import rpo.ops

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, generator=gen, dtype=torch.float64)
    b = torch.randn(3, generator=gen, dtype=torch.float64)
    e = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    f = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    cos = (e @ f.T) / (e.norm(dim=1)[:, None] * f.norm(dim=1)[None, :])
    tau, beta = 0.5, 0.3
    cases = {"embedding": torch.softmax(-(1 - cos) / tau, dim=1), "uniform": torch.full((5, 3), 1 / 3,
                                                                                          dtype=torch.float64)}
    for weighting, weights in cases.items():
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
            a_op, b_op = (t.to(dtype).clone().requires_grad_() for t in (a, b))
            loss = rpo.ops.contrast_loss(a_op, b_op, beta=beta, weighting=weighting, tau=tau,
                                         chosen_embeddings=e.to(dtype), rejected_embeddings=f.to(dtype))
            loss.backward()
            # The reference sees the same (rounded) scores as the op.
            a_ref, b_ref = (t.detach().double().clone().requires_grad_() for t in (a_op, b_op))
            ref = formula_loss(a_ref, b_ref, weights, beta)
            ref.backward()
            error = max(abs(loss.item() - ref.item()) / abs(ref.item()),
                        ((a_op.grad.double() - a_ref.grad).abs().max() / a_ref.grad.abs().max()).item(),
                        ((b_op.grad.double() - b_ref.grad).abs().max() / b_ref.grad.abs().max()).item())
            key = f"op_{weighting}_{str(dtype)[6:]}_relative_error"
            results[key] = error
            if not error <= tol:
                failures.append(f"{key} = {error:.3e} > {tol:g}")


def check_registry(results, failures):
    from rpo.losses import available_losses, build_loss

    names = sorted(available_losses())
    results["losses"] = names
    for name in ("dpo", "rpo", "simpo"):
        if name not in names:
            failures.append(f"loss {name!r} is not registered")
    policy_chosen = torch.tensor([-10.0, -12.0], dtype=torch.float64)
    policy_rejected = torch.tensor([-11.0, -11.5], dtype=torch.float64)
    ref_chosen = torch.tensor([-10.5, -12.5], dtype=torch.float64)
    ref_rejected = torch.tensor([-10.8, -11.0], dtype=torch.float64)
    dpo = build_loss("dpo", beta=0.1)
    out = dpo(policy_chosen_logps=policy_chosen, policy_rejected_logps=policy_rejected,
              reference_chosen_logps=ref_chosen, reference_rejected_logps=ref_rejected)
    margins = 0.1 * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    expected = sum(-math.log(1 / (1 + math.exp(-m))) for m in margins.tolist()) / 2
    results["dpo_loss"], results["dpo_expected"] = out.loss.item(), expected
    if abs(out.loss.item() - expected) > 1e-12:
        failures.append(f"dpo loss {out.loss.item()} != closed form {expected}")
    rpo_loss = build_loss("rpo", weighting="uniform")
    results["rpo_built"] = type(rpo_loss).__name__


def check_imports(results, failures):
    """Every subpackage imports with the wheel's declared dependencies (megatron-core, datasets, ...)."""
    import importlib

    modules = ("rpo.data", "rpo.distributed", "rpo.evaluation", "rpo.losses", "rpo.models", "rpo.ops",
               "rpo.train.trainer")
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - report every failing module, not just the first
            failures.append(f"import {name}: {type(exc).__name__}: {exc}")
    results["modules_imported"] = list(modules)


def main() -> int:
    results, failures = {}, []
    import rpo
    import rpo.ops

    results["python"] = sys.executable
    results["rpo_file"] = rpo.__file__
    results["rpo_from_environment"] = inside(rpo.__file__, sys.prefix)
    results["extension_available"] = rpo.ops.extension_available()
    if not results["rpo_from_environment"]:
        failures.append(f"rpo imported from {rpo.__file__}, not from the environment {sys.prefix}")
    if results["extension_available"]:
        import rpo._C

        results["extension_file"] = rpo._C.__file__
        if not inside(rpo._C.__file__, sys.prefix):
            failures.append(f"rpo._C loaded from {rpo._C.__file__}, outside {sys.prefix}")
    else:
        failures.append("the compiled op rpo._C did not load")
    distribution = importlib.metadata.distribution("rpo")
    results["rpo_version"] = distribution.version
    torch_release = torch.__version__.split("+")[0]
    results["torch"] = torch.__version__
    results["torch_requirement"] = [r for r in distribution.requires or [] if r.replace(" ", "").startswith("torch")]
    if results["torch_requirement"] != [f"torch=={torch_release}"]:
        failures.append(f"wheel requires {results['torch_requirement']}, expected torch=={torch_release}")
    check_op(results, failures)
    check_registry(results, failures)
    check_imports(results, failures)
    results["failures"] = failures
    print(json.dumps(results))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

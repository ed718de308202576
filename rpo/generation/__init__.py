"""On-policy preference data (``rpo-generate``, ``python -m rpo.generation``; docs/generation.md).

    rows, counts = build_pairs(samples, prompts, source_rows, min_gap=0.0)        # best vs worst per prompt
    rows, counts = build_unpaired(samples, prompts, source_rows, threshold=0.0)   # labelled by a score threshold

The sampling itself (seeded per sample, batched with a KV cache) is rpo.evaluation.sampling; the judges are
rpo.evaluation.judges.
"""
from rpo.generation.pairs import build_pairs, build_unpaired

__all__ = ["build_pairs", "build_unpaired"]

"""A point of the reward-KL frontier: a pointwise judge's mean score of a policy's samples and its KL estimate
from the reference, both with 95% intervals, paired by prompt against the reference's samples.

For each prompt i: n samples y ~ π(.|x_i) and n samples from π_ref with the same per-sample seeds (common random
numbers: a policy equal to its reference draws the same samples, and the paired difference is exactly 0);

- score_i = mean of the judge's scores of the policy's samples (NaN scores, "not scored", are left out and
  counted), ref_score_i the same for the reference's, diff_i = score_i − ref_score_i;
- kl_i = mean over the policy's samples of Σ_t log π(y_t|x_i, y_<t) − log π_ref(y_t|x_i, y_<t): an unbiased
  estimate of KL(π(.|x_i) || π_ref(.|x_i)) over responses of at most max_new_tokens tokens (samples at
  temperature 1 and top_p 1, the policy's own distribution).

Each reported mean is over prompts, with a Student-t 95% interval over the per-prompt values (prompts are the
independent units; a prompt's samples are not).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from rpo.evaluation.sampling import Sample

CONFIDENCE = 0.95


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """Mean, Student-t interval (n − 1 degrees of freedom), standard deviation and n of finite ``values``."""
    from scipy.stats import t as student_t

    data = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = int(data.size)
    if n == 0:
        return {"mean": None, "ci_low": None, "ci_high": None, "sd": None, "n": 0}
    mean = float(data.mean())
    if n == 1:
        return {"mean": mean, "ci_low": None, "ci_high": None, "sd": None, "n": 1}
    sd = float(data.std(ddof=1))
    half = float(student_t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "sd": sd, "n": n}


def _per_prompt(samples: Sequence[Sample], values: Sequence[float], prompts: int) -> list[float]:
    sums, counts = [0.0] * prompts, [0] * prompts
    for sample, value in zip(samples, values):
        if value is not None and math.isfinite(value):
            sums[sample.prompt_index] += value
            counts[sample.prompt_index] += 1
    return [s / c if c else float("nan") for s, c in zip(sums, counts)]


def frontier_point(prompts: int, policy_samples: Sequence[Sample], policy_scores: Sequence[float],
                   reference_samples: Optional[Sequence[Sample]] = None,
                   reference_scores: Optional[Sequence[float]] = None,
                   reference_logps: Optional[Sequence[float]] = None) -> dict:
    """The summary of the module docstring. ``reference_logps``: log π_ref of each policy sample (for the KL);
    None = no KL. Per-prompt values are returned too (``per_prompt``), for paired comparisons between policies."""
    if len(policy_scores) != len(policy_samples):
        raise ValueError(f"{len(policy_samples)} samples but {len(policy_scores)} scores")
    score = _per_prompt(policy_samples, policy_scores, prompts)
    out = {"prompts": prompts, "samples": len(policy_samples),
           "samples_per_prompt": len(policy_samples) / prompts if prompts else 0,
           "score": mean_interval(score),
           "unscored": sum(1 for s in policy_scores if not math.isfinite(s)),
           "cut_off": sum(1 for s in policy_samples if not s.ended),
           "response_tokens": float(np.mean([len(s.token_ids) for s in policy_samples])) if policy_samples else 0.0,
           "per_prompt": {"score": score}}
    if reference_samples is not None:
        reference = _per_prompt(reference_samples, reference_scores, prompts)
        out["reference_score"] = mean_interval(reference)
        out["difference"] = mean_interval([a - b for a, b in zip(score, reference)])
        out["reference_unscored"] = sum(1 for s in reference_scores if not math.isfinite(s))
        out["reference_cut_off"] = sum(1 for s in reference_samples if not s.ended)
        out["per_prompt"]["reference_score"] = reference
    if reference_logps is not None:
        if len(reference_logps) != len(policy_samples):
            raise ValueError(f"{len(policy_samples)} samples but {len(reference_logps)} reference log-probs")
        log_ratios = [s.logp - r for s, r in zip(policy_samples, reference_logps)]
        kl = _per_prompt(policy_samples, log_ratios, prompts)
        out["kl"] = mean_interval(kl)
        out["per_prompt"]["kl"] = kl
    return out


def format_interval(summary: Optional[dict], digits: int = 3) -> str:
    if not summary or summary.get("mean") is None:
        return "-"
    if summary.get("ci_low") is None:
        return f"{summary['mean']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} [{summary['ci_low']:.{digits}f}, {summary['ci_high']:.{digits}f}]"

"""The start-of-run effective-beta notice, fed with the contrast/* metrics of real losses (closed forms below)."""
import logging

import pytest
import torch

from rpo.losses import build_loss
from rpo.train.reporting import FAR_BELOW_BETA, effective_beta_notice

BETA = 0.1


def _metrics(num_pairs: int, **options):
    torch.manual_seed(0)
    logps = {key: torch.randn(num_pairs, dtype=torch.float64) for key in (
        "policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")}
    output = build_loss("rpo", beta=BETA, weighting="uniform", **options)(**logps)
    return {key: float(value) for key, value in output.metrics.items()}


@pytest.mark.parametrize("num_pairs", [8, 64])
def test_row_normalisation_warns_with_beta_over_n(num_pairs):
    # uniform weights, rows summing to 1: every pair's weight is 1/N, so its effective beta is beta/N.
    metrics = _metrics(num_pairs)
    assert metrics["contrast/diag_effective_beta"] == pytest.approx(BETA / num_pairs, rel=1e-6)  # metrics are float32
    level, message = effective_beta_notice(metrics, BETA)
    assert level == logging.WARNING and BETA / num_pairs < FAR_BELOW_BETA * BETA
    assert f"{BETA / num_pairs:.4g}" in message and "far below beta" in message


@pytest.mark.parametrize("num_pairs", [8, 64])
def test_mean_normalisation_keeps_beta_and_informs(num_pairs):
    metrics = _metrics(num_pairs, weight_normalization="mean")
    assert metrics["contrast/offdiag_effective_beta"] == pytest.approx(BETA, rel=1e-6)  # metrics are float32
    level, message = effective_beta_notice(metrics, BETA)
    assert level == logging.INFO and "far below" not in message and f"{BETA:.4g}" in message


def test_reference_columns_keeps_the_per_rank_scale():
    # 64 global columns normalised to a reference of K = 8: rows sum to N/K, so a uniform weight is 1/K and the
    # effective beta is beta/K, the same as an 8-column matrix with the row normalisation.
    metrics = _metrics(64, weight_normalization="reference_columns", normalization_columns=8)
    assert metrics["contrast/diag_effective_beta"] == pytest.approx(BETA / 8, rel=1e-6)  # metrics are float32
    assert metrics["contrast/diag_effective_beta"] == pytest.approx(_metrics(8)["contrast/diag_effective_beta"])
    # beta/8 is below FAR_BELOW_BETA x beta, but it is the chosen scale (--global-contrast's default), not a
    # matrix that shrinks beta as it grows: stated, not warned about; without the normalisation's name it warns.
    assert BETA / 8 < FAR_BELOW_BETA * BETA
    level, message = effective_beta_notice(metrics, BETA, "reference_columns")
    assert level == logging.INFO and "far below" not in message and "reference_columns" in message
    level, _ = effective_beta_notice(metrics, BETA)
    assert level == logging.WARNING
    level, message = effective_beta_notice(_metrics(8), BETA, "row")
    assert level == logging.WARNING and "far below beta" in message


def test_no_notice_without_a_contrast_matrix():
    assert effective_beta_notice({"loss": 0.69, "rewards/margins": 0.0}, BETA) is None
    assert effective_beta_notice(_metrics(8), None) is None

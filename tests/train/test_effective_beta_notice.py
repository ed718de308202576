"""The start-of-run effective-beta notice, fed with the contrast/* metrics of real losses (closed forms below)."""
import logging

import pytest
import torch

from rpo.losses import build_loss
from rpo.train.reporting import FAR_BELOW_BETA, effective_beta_notice, effective_beta_notices

BETA = 0.1


def _batch(num_pairs: int):
    torch.manual_seed(0)
    batch = {key: torch.randn(num_pairs, dtype=torch.float64) for key in (
        "policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")}
    batch.update(chosen_lengths=torch.randint(5, 20, (num_pairs,)), rejected_lengths=torch.randint(5, 20, (num_pairs,)))
    return batch


def _run(loss, num_pairs: int):
    batch = {key: value for key, value in _batch(num_pairs).items() if key in loss.requires | loss.optional}
    return {key: float(value) for key, value in loss(**batch).metrics.items()}


def _metrics(num_pairs: int, **options):
    return _run(build_loss("rpo", beta=BETA, weighting="uniform", **options), num_pairs)


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


def test_a_combination_has_one_notice_per_contrast_term_from_that_terms_metrics():
    # Each term's notice must equal the one of the term trained alone on the same batch: rpo (row, beta 0.1) warns,
    # simpo-rpo (mean, its beta 2) informs; dpo and sft have no contrast matrix and no notice.
    rpo = dict(beta=BETA, weighting="uniform", weight_normalization="row")
    simpo_rpo = dict(beta=2.0, weighting="uniform", weight_normalization="mean")
    combined = build_loss([["rpo", 1.0, rpo], ["dpo", 0.5, {"beta": BETA}], ["simpo-rpo", 0.3, simpo_rpo],
                           ["sft", 0.2]])
    notices = effective_beta_notices(combined, _run(combined, 8))
    alone = [effective_beta_notice(_run(build_loss(name, **options), 8), options["beta"],
                                   options["weight_normalization"]) for name, options in (("rpo", rpo),
                                                                                          ("simpo-rpo", simpo_rpo))]
    assert [level for level, _ in notices] == [logging.WARNING, logging.INFO]
    assert notices == [(alone[0][0], f"rpo: {alone[0][1]}"), (alone[1][0], f"simpo-rpo: {alone[1][1]}")]
    assert f"{BETA / 8:.4g}" in notices[0][1] and f"{2.0:.4g} (1 x beta)" in notices[1][1]


def test_a_single_loss_has_the_plain_notice_and_a_loss_without_contrast_none():
    rpo = build_loss("rpo", beta=BETA, weighting="uniform")
    assert effective_beta_notices(rpo, _run(rpo, 8)) == [effective_beta_notice(_metrics(8), BETA, "row")]
    assert effective_beta_notices(build_loss("dpo+0.2*sft"), {"loss": 0.69}) == []
    assert effective_beta_notices(build_loss("dpo"), {"loss": 0.69}) == []


def test_the_run_report_logs_each_terms_notice_after_the_first_step_only(tmp_path, caplog):
    from types import SimpleNamespace

    from rpo.train.reporting import RunReport

    combined = build_loss([["rpo", 1.0, dict(beta=BETA, weighting="uniform")], ["sft", 0.2]])
    trainer = SimpleNamespace(loss=combined, last_step_metrics=_run(combined, 8), step=0, total_steps=3)
    report = RunReport(tmp_path, progress_bar=False)
    report.on_fit_start(trainer)
    with caplog.at_level(logging.INFO, logger="rpo.train"):
        for step in (1, 2):
            report.on_step_end(trainer, step, None)
    logged = [(record.levelno, record.getMessage()) for record in caplog.records if "effective beta" in record.message]
    assert logged == effective_beta_notices(combined, trainer.last_step_metrics)
    assert len(logged) == 1 and logged[0][0] == logging.WARNING and logged[0][1].startswith("rpo: ")

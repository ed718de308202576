"""Loss registry and built-in losses against closed-form float64 formulas written here (never the implementation).

Notation: ρ = log π_θ − log π_ref per sequence, h_i = ρ_chosen,i − ρ_rejected,i, nls(x) = −log σ(x).
The rpo losses call the real rpo.ops.contrast_loss (float64 path).
"""
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import rpo.distributed
import rpo.ops
from rpo.losses import (BATCH_KEYWORDS, LossConfigError, LossInputError, LossOutput, available_losses, build_loss,
                        register_loss, resolve_loss)

REPO = Path(__file__).resolve().parents[2]
PLUGINS = Path(__file__).resolve().parent / "plugins"
EXAMPLE_PLUGIN = REPO / "examples" / "simpo_rpo.py"
LOGPS = ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")
BUILT_INS = ("dpo", "ipo", "kto", "rpo", "rpo-z", "simpo", "simpo-rpo", "sft")
RTOL, ATOL = 1e-9, 1e-12


# --- closed forms ------------------------------------------------------------------------------------------------

def nls(x):
    """−log σ(x), written stably: max(−x, 0) + log(1 + e^−|x|)."""
    return torch.clamp(-x, min=0) + torch.log1p(torch.exp(-x.abs()))


def sig(x):
    return 1.0 / (1.0 + torch.exp(-x))


def dense_weights(rows, columns, weighting, chosen_embeddings=None, rejected_embeddings=None, tau=0.5, alpha=0.8,
                  normalization="row", reference_columns=None):
    """ω of the paper: embedding = row-normalised exp(−(1 − cos)/τ); uniform 1/N; diagonal α / (1−α)/(N−1).
    normalization "mean": × N (rows sum to N); "reference_columns": × N/K (rows sum to N/K)."""
    if weighting == "none":
        return torch.ones(rows, columns, dtype=torch.float64)
    if weighting == "embedding":
        cos = (chosen_embeddings @ rejected_embeddings.T) / (
            chosen_embeddings.norm(dim=1)[:, None] * rejected_embeddings.norm(dim=1)[None, :])
        unnormalised = torch.exp(-(1.0 - cos) / tau)
        weights = unnormalised / unnormalised.sum(dim=1, keepdim=True)
    elif weighting == "uniform":
        weights = torch.full((rows, columns), 1.0 / columns, dtype=torch.float64)
    else:
        weights = torch.full((rows, columns), (1.0 - alpha) / (columns - 1), dtype=torch.float64)
        weights.fill_diagonal_(alpha)
    if normalization == "reference_columns":
        return weights * columns / reference_columns
    return weights * columns if normalization == "mean" else weights


def contrast_closed_form(a, b, weights, beta, margin=0.0):
    """L = 1/(MN) Σ nls(s_ij), s_ij = ω_ij(β(a_i − b_j) − m); dL/da_i = −Σ_j ω β σ(−s)/(MN), dL/db_j = +Σ_i."""
    rows, columns = weights.shape
    s = weights * (beta * (a[:, None] - b[None, :]) - margin)
    coefficient = weights * beta * sig(-s) / (rows * columns)
    return nls(s).sum() / (rows * columns), -coefficient.sum(dim=1), coefficient.sum(dim=0), s


# --- batches -----------------------------------------------------------------------------------------------------

def make_batch(rows, columns, seed, *, extreme=False, paired=None, width=8, kl_rows=5):
    """Random float64 batch. extreme: log-ratios ρ = ±1e4. paired: rejected row i has chosen row i's prompt."""
    generator = torch.Generator().manual_seed(seed)
    paired = rows == columns if paired is None else paired

    def uniform(n, low, high):
        return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)

    reference_chosen, reference_rejected = uniform(rows, -90, -20), uniform(columns, -90, -20)
    if extreme:
        sign_chosen = torch.tensor([(-1.0) ** i for i in range(rows)], dtype=torch.float64)
        sign_rejected = torch.tensor([(-1.0) ** (i + 1) for i in range(columns)], dtype=torch.float64)
        chosen_ratio, rejected_ratio = 1e4 * sign_chosen, 1e4 * sign_rejected
    else:
        chosen_ratio, rejected_ratio = uniform(rows, -4, 4), uniform(columns, -4, 4)
    chosen_embeddings = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    rejected_embeddings = (chosen_embeddings.clone() if paired
                           else torch.randn(columns, width, generator=generator, dtype=torch.float64))
    batch = {
        "policy_chosen_logps": reference_chosen + chosen_ratio,
        "policy_rejected_logps": reference_rejected + rejected_ratio,
        "reference_chosen_logps": reference_chosen,
        "reference_rejected_logps": reference_rejected,
        "chosen_lengths": torch.randint(3, 40, (rows,), generator=generator),
        "rejected_lengths": torch.randint(3, 40, (columns,), generator=generator),
        "chosen_embeddings": chosen_embeddings,
        "rejected_embeddings": rejected_embeddings,
        "kl_policy_logps": uniform(kl_rows, -80, -30),
        "kl_reference_logps": uniform(kl_rows, -80, -30),
    }
    for key in LOGPS:
        batch[key] = batch[key].detach().requires_grad_(True)
    return batch


def run(loss, batch):
    """(LossOutput, {logps keyword: gradient}) with zeros for keywords the loss does not depend on."""
    output = loss(**batch)
    grads = torch.autograd.grad(output.loss, [batch[key] for key in LOGPS], allow_unused=True)
    return output, {key: torch.zeros_like(batch[key]) if g is None else g for key, g in zip(LOGPS, grads)}


def ratios(batch):
    d = {key: batch[key].detach() for key in LOGPS}
    return (d["policy_chosen_logps"] - d["reference_chosen_logps"],
            d["policy_rejected_logps"] - d["reference_rejected_logps"])


def grads_from_ratios(grad_chosen_ratio, grad_rejected_ratio):
    """Gradients w.r.t. the four log-prob vectors when the loss depends on them only through ρ."""
    return {"policy_chosen_logps": grad_chosen_ratio, "reference_chosen_logps": -grad_chosen_ratio,
            "policy_rejected_logps": grad_rejected_ratio, "reference_rejected_logps": -grad_rejected_ratio}


def assert_matches(output, grads, expected_value, expected_grads):
    assert torch.isfinite(output.loss), output.loss
    torch.testing.assert_close(output.loss.detach(), expected_value, rtol=RTOL, atol=ATOL)
    for key in LOGPS:
        assert torch.isfinite(grads[key]).all(), key
        torch.testing.assert_close(grads[key], expected_grads[key], rtol=RTOL, atol=ATOL, msg=lambda m: f"{key}: {m}")


def metric(output, name):
    value = output.metrics[name]
    assert isinstance(value, torch.Tensor) and value.dtype == torch.float32 and value.dim() == 0, (name, value)
    return value.item()


# --- separable losses --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extreme", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_dpo_value_and_gradient(extreme, label_smoothing):
    batch, beta, eps = make_batch(7, 7, seed=1, extreme=extreme), 0.1, label_smoothing
    output, grads = run(build_loss("dpo", label_smoothing=eps), batch)
    chosen, rejected = ratios(batch)
    x = beta * (chosen - rejected)
    expected = ((1 - eps) * nls(x) + eps * nls(-x)).mean()
    d_chosen = beta * (-(1 - eps) * sig(-x) + eps * sig(x)) / 7
    assert_matches(output, grads, expected, grads_from_ratios(d_chosen, -d_chosen))
    assert metric(output, "rewards/accuracies") == pytest.approx((chosen > rejected).double().mean().item())
    assert metric(output, "rewards/margins") == pytest.approx(beta * (chosen - rejected).mean().item(), rel=1e-5)
    assert metric(output, "logps/chosen") == pytest.approx(batch["policy_chosen_logps"].mean().item(), rel=1e-5)


@pytest.mark.parametrize("extreme", [False, True])
@pytest.mark.parametrize("length_normalized", [False, True])
def test_ipo_value_and_gradient(extreme, length_normalized):
    batch, beta = make_batch(6, 6, seed=2, extreme=extreme), 0.1
    output, grads = run(build_loss("ipo", length_normalized=length_normalized), batch)
    chosen, rejected = ratios(batch)
    chosen_scale = 1 / batch["chosen_lengths"].double() if length_normalized else torch.ones(6, dtype=torch.float64)
    rejected_scale = (1 / batch["rejected_lengths"].double() if length_normalized
                      else torch.ones(6, dtype=torch.float64))
    h = chosen * chosen_scale - rejected * rejected_scale
    expected = ((h - 1 / (2 * beta)) ** 2).mean()
    d_h = 2 * (h - 1 / (2 * beta)) / 6
    assert_matches(output, grads, expected, grads_from_ratios(d_h * chosen_scale, -d_h * rejected_scale))


@pytest.mark.parametrize("extreme", [False, True])
def test_simpo_value_and_gradient(extreme):
    batch, beta, gamma = make_batch(5, 5, seed=3, extreme=extreme), 2.0, 0.5
    output, grads = run(build_loss("simpo"), batch)
    chosen_len, rejected_len = batch["chosen_lengths"].double(), batch["rejected_lengths"].double()
    s = beta * batch["policy_chosen_logps"].detach() / chosen_len - beta * batch[
        "policy_rejected_logps"].detach() / rejected_len - gamma
    expected_grads = {key: torch.zeros(5, dtype=torch.float64) for key in LOGPS}
    expected_grads["policy_chosen_logps"] = -sig(-s) * beta / chosen_len / 5
    expected_grads["policy_rejected_logps"] = sig(-s) * beta / rejected_len / 5
    assert_matches(output, grads, nls(s).mean(), expected_grads)
    assert not build_loss("simpo").needs_reference


@pytest.mark.parametrize("rows,columns,use_kl,extreme", [
    (5, 5, True, False),    # paired, positive KL reference point
    (3, 6, False, False),   # unpaired M != N, z = 0
    (6, 2, True, True),     # unpaired, extreme log-ratios
    (4, 0, False, False),   # only desirable examples in this micro-batch
])
def test_kto_value_and_gradient(rows, columns, use_kl, extreme):
    batch = make_batch(rows, columns, seed=4, extreme=extreme, paired=False)
    batch["kl_policy_logps"] = batch["kl_reference_logps"] + torch.linspace(-0.5, 2.0, 5, dtype=torch.float64)
    beta, w_desirable, w_undesirable = 0.1, 1.5, 0.5
    if not use_kl:
        del batch["kl_policy_logps"], batch["kl_reference_logps"]
    loss = build_loss("kto", desirable_weight=w_desirable, undesirable_weight=w_undesirable)
    output, grads = run(loss, batch)
    chosen, rejected = ratios(batch)
    z = 0.75 if use_kl else 0.0  # max(0, mean(linspace(-0.5, 2, 5))) = 0.75
    x, y = beta * (chosen - z), beta * (z - rejected)
    total = rows + columns
    expected = ((w_desirable * (1 - sig(x))).sum() + (w_undesirable * (1 - sig(y))).sum()) / total
    d_chosen = -w_desirable * beta * sig(x) * (1 - sig(x)) / total
    d_rejected = w_undesirable * beta * sig(y) * (1 - sig(y)) / total
    assert_matches(output, grads, expected, grads_from_ratios(d_chosen, d_rejected))
    assert metric(output, "kl") == pytest.approx(z)


def test_kto_reference_point_is_clamped_and_detached():
    batch = make_batch(4, 3, seed=5, paired=False)
    batch["kl_policy_logps"] = (batch["kl_reference_logps"] - 1.0).requires_grad_(True)  # mean KL −1 -> z = 0
    output = build_loss("kto")(**batch)
    assert metric(output, "kl") == 0.0
    (kl_grad,) = torch.autograd.grad(output.loss, [batch["kl_policy_logps"]], allow_unused=True)
    assert kl_grad is None or torch.count_nonzero(kl_grad) == 0
    no_kl = {k: v for k, v in batch.items() if not k.startswith("kl_")}
    torch.testing.assert_close(output.loss, build_loss("kto")(**no_kl).loss, rtol=0, atol=0)
    with pytest.raises(LossInputError, match="kl_reference_logps"):
        build_loss("kto")(**{**no_kl, "kl_policy_logps": batch["kl_policy_logps"]})


@pytest.mark.parametrize("extreme", [False, True])
def test_sft_value_and_gradient(extreme):
    batch = make_batch(4, 6, seed=6, extreme=extreme)
    output, grads = run(build_loss("sft"), batch)
    tokens = batch["chosen_lengths"].double().sum()
    expected_grads = {key: torch.zeros_like(batch[key]) for key in LOGPS}
    expected_grads["policy_chosen_logps"] = torch.full((4,), -1 / tokens.item(), dtype=torch.float64)
    assert_matches(output, grads, -batch["policy_chosen_logps"].detach().sum() / tokens, expected_grads)


def test_sft_split_with_the_steps_tokens_per_row_sums_to_the_whole_batch_token_mean():
    """The trainer weights each micro-batch / rank's separable loss by its share of the step's rows; with
    chosen_tokens_per_row, sft's shares sum to the token mean of the whole batch, however unequal the token counts
    of the parts (without it they would sum to a mean of per-part token means)."""
    batch = make_batch(6, 6, seed=31)
    lengths = batch["chosen_lengths"].clone()
    lengths[:2] = 100  # the first part holds many more tokens per row than the second
    logps = batch["policy_chosen_logps"]
    whole = -logps.sum() / lengths.double().sum()
    rows = 12
    per_row = lengths.sum().item() / rows
    parts = [slice(0, 2), slice(2, 6)]
    weighted = per_part_means = 0
    for part in parts:
        inputs = {"policy_chosen_logps": logps[part], "chosen_lengths": lengths[part],
                  "policy_rejected_logps": batch["policy_rejected_logps"][part]}
        part_rows = 2 * (part.stop - part.start)
        weighted = weighted + build_loss("sft")(**inputs, chosen_tokens_per_row=per_row).loss * part_rows / rows
        per_part_means = per_part_means + build_loss("sft")(**inputs).loss * part_rows / rows
    torch.testing.assert_close(weighted, whole, rtol=1e-12, atol=0)
    assert abs(per_part_means - whole) > 1e-3  # the old weighting was not the token mean
    # One call on the whole batch: both forms agree.
    inputs = {key: batch[key] for key in ("policy_chosen_logps", "policy_rejected_logps")}
    torch.testing.assert_close(build_loss("sft")(**inputs, chosen_lengths=lengths, chosen_tokens_per_row=per_row).loss,
                               whole, rtol=1e-12, atol=0)
    with pytest.raises(LossInputError, match="chosen_tokens_per_row must be > 0"):
        build_loss("sft")(**inputs, chosen_lengths=lengths, chosen_tokens_per_row=0.0)


# --- contrast losses ---------------------------------------------------------------------------------------------

RPO_CASES = [  # rows, columns, weighting, normalization, margin, extreme
    (6, 6, "embedding", "row", 0.0, False),
    (4, 7, "embedding", "row", 0.0, False),     # unpaired
    (7, 4, "embedding", "mean", 0.3, False),
    (5, 5, "uniform", "row", 0.0, False),
    (3, 8, "uniform", "mean", 0.0, False),
    (6, 6, "diagonal", "row", 0.0, False),
    (6, 6, "diagonal", "mean", 0.2, False),
    (4, 6, "none", "row", 0.0, False),
    (6, 6, "embedding", "row", 0.0, True),
    (5, 3, "uniform", "row", 0.0, True),
    (6, 6, "diagonal", "row", 0.0, True),
    (6, 6, "embedding", "reference_columns", 0.2, False),
    (5, 8, "uniform", "reference_columns", 0.0, False),
    (6, 6, "diagonal", "reference_columns", 0.0, True),
    (4, 6, "none", "reference_columns", 0.1, False),
]
REFERENCE_COLUMNS = 4  # K of the "reference_columns" cases


@pytest.mark.parametrize("rows,columns,weighting,normalization,margin,extreme", RPO_CASES)
def test_rpo_value_and_gradient(rows, columns, weighting, normalization, margin, extreme):
    batch, beta, tau, alpha = make_batch(rows, columns, seed=7, extreme=extreme), 0.1, 0.5, 0.7
    columns_option = {"normalization_columns": REFERENCE_COLUMNS} if normalization == "reference_columns" else {}
    loss = build_loss("rpo", weighting=weighting, weight_normalization=normalization, margin=margin, tau=tau,
                      alpha=alpha if weighting == "diagonal" else None, **columns_option)
    output, grads = run(loss, batch)
    weights = dense_weights(rows, columns, weighting, batch["chosen_embeddings"], batch["rejected_embeddings"], tau,
                            alpha, normalization, REFERENCE_COLUMNS)
    chosen, rejected = ratios(batch)
    expected, d_chosen, d_rejected, _ = contrast_closed_form(chosen, rejected, weights, beta, margin)
    assert_matches(output, grads, expected, grads_from_ratios(d_chosen, d_rejected))

    wins = (chosen[:, None] > rejected[None, :]).double()
    off_diagonal = ~torch.eye(rows, columns, dtype=torch.bool)
    paired_accuracy = (chosen > rejected).double().mean() if rows == columns else wins.mean()
    assert metric(output, "rewards/accuracies") == pytest.approx(paired_accuracy.item())
    assert metric(output, "contrast/offdiag_accuracy") == pytest.approx(wins[off_diagonal].mean().item())
    assert metric(output, "contrast/effective_beta") == pytest.approx((beta * weights).mean().item(), rel=1e-5)
    assert metric(output, "contrast/diag_weight") == pytest.approx(
        weights.diagonal().mean().item(), rel=1e-5)
    # The other contrast/* metrics (by row blocks in the library; the whole matrix here).
    diagonal = torch.eye(rows, columns, dtype=torch.bool)
    difference = beta * (chosen[:, None] - rejected[None, :])
    row_distribution = weights / weights.sum(dim=1, keepdim=True)
    row_entropy = -(row_distribution * torch.log(row_distribution)).nan_to_num().sum(dim=1)
    expected_metrics = {
        "contrast/diag_effective_beta": beta * weights[diagonal].mean(),
        "contrast/offdiag_effective_beta": beta * weights[off_diagonal].mean(),
        "contrast/diag_accuracy": (difference[diagonal] > 0).double().mean(),
        "contrast/diag_margin": difference[diagonal].mean(),
        "contrast/offdiag_margin": difference[off_diagonal].mean(),
        "contrast/effective_contrasts": row_entropy.exp().mean(),
    }
    for name, value in expected_metrics.items():
        assert metric(output, name) == pytest.approx(value.item(), rel=1e-5, abs=1e-6), name


@pytest.mark.parametrize("extreme", [False, True])
def test_rpo_diagonal_alpha_one_is_dpo_divided_by_m(extreme):
    """weighting="diagonal", alpha=1, weight_normalization="row": ω_ii = 1 and ω_ij = (1−1)/(M−1) = 0, so every
    off-diagonal term is nls(0) = log 2, a constant, and L_rpo = (Σ_i nls(βh_i) + M(M−1)·log 2)/M²
    = L_dpo/M + (M−1)/M·log 2 with L_dpo = (1/M)Σ_i nls(βh_i): the gradient is exactly dpo's divided by M.
    (weight_normalization="mean" would give ω_ii = M, i.e. β·M on the diagonal: not DPO.)"""
    rows = 6
    batch = make_batch(rows, rows, seed=8, extreme=extreme)
    rpo_output, rpo_grads = run(build_loss("rpo", weighting="diagonal", alpha=1.0), batch)
    dpo_output, dpo_grads = run(build_loss("dpo"), batch)
    chosen, rejected = ratios(batch)
    expected_dpo = nls(0.1 * (chosen - rejected)).mean()
    torch.testing.assert_close(dpo_output.loss.detach(), expected_dpo, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(rpo_output.loss.detach(), expected_dpo / rows + (rows - 1) / rows * math.log(2),
                               rtol=1e-12, atol=1e-12)
    for key in LOGPS:
        torch.testing.assert_close(rpo_grads[key], dpo_grads[key] / rows, rtol=1e-12, atol=1e-15)
    assert metric(rpo_output, "contrast/diag_weight") == 1.0
    assert metric(rpo_output, "contrast/effective_beta") == pytest.approx(0.1 / rows)


def authors_loss(chosen, rejected, batch, weighting, beta, alpha, tau, margin=0.0):
    """The authors' formulas, float64, autograd for the gradients (transcribed from their description):
    diagonal: mean_i [α·nls(β h_ii − m) + (1−α)·mean_{j≠i} nls(β(a_i − b_j) − m)], α OUTSIDE the sigmoid;
    embedding / uniform / none: mean_ij nls(ω_ij·(β(a_i − b_j) − m)) with ω = row-normalised
    exp(−(1 − cos)/τ), 1/N, 1. nls is softplus(−x) here: its autograd derivative is right at x = 0, which the
    extreme batches hit (the clamp form's is not)."""
    def nls(x):
        return F.softplus(-x)

    rows, columns = chosen.shape[0], rejected.shape[0]
    pair_logits = beta * (chosen[:, None] - rejected[None, :]) - margin
    if weighting == "diagonal":
        per_pair = nls(pair_logits)
        diagonal_terms = per_pair.diagonal()
        off_diagonal_means = (per_pair.sum(dim=1) - diagonal_terms) / (columns - 1)
        return (alpha * diagonal_terms + (1 - alpha) * off_diagonal_means).mean()
    if weighting == "embedding":
        e, f = batch["chosen_embeddings"], batch["rejected_embeddings"]
        similarity = torch.exp(-(1 - (e @ f.T) / (e.norm(dim=1)[:, None] * f.norm(dim=1)[None, :])) / tau)
        weights = similarity / similarity.sum(dim=1, keepdim=True)
    elif weighting == "uniform":
        weights = torch.full((rows, columns), 1.0 / columns, dtype=torch.float64)
    else:
        weights = torch.ones(rows, columns, dtype=torch.float64)
    return nls(weights * pair_logits).mean()


@pytest.mark.parametrize("extreme", [False, True])
@pytest.mark.parametrize("weighting", ["embedding", "uniform", "diagonal", "none"])
@pytest.mark.parametrize("name", ["rpo", "simpo-rpo"])
def test_authors_form_matches_the_authors_formulas(name, weighting, extreme):
    """form="authors" equals the float64 transcription above (loss and gradients, 1e-10) for every weighting."""
    rows, beta, alpha, tau = 8, (0.1 if name == "rpo" else 2.0), 0.8, 0.5
    batch = make_batch(rows, rows, seed=20, extreme=extreme)
    diagonal_alpha = alpha if weighting == "diagonal" else None  # α is an option of the diagonal weighting only
    output, grads = run(build_loss(name, weighting=weighting, form="authors", alpha=diagonal_alpha, tau=tau), batch)
    policy = {key: batch[key].detach().clone().requires_grad_(True) for key in LOGPS}
    if name == "rpo":
        chosen = policy["policy_chosen_logps"] - policy["reference_chosen_logps"]
        rejected = policy["policy_rejected_logps"] - policy["reference_rejected_logps"]
        margin = 0.0
    else:
        chosen = policy["policy_chosen_logps"] / batch["chosen_lengths"].double()
        rejected = policy["policy_rejected_logps"] / batch["rejected_lengths"].double()
        margin = 0.5
    expected = authors_loss(chosen, rejected, batch, weighting, beta, alpha, tau, margin)
    expected_grads = torch.autograd.grad(expected, [policy[key] for key in LOGPS], allow_unused=True)
    expected_grads = {key: torch.zeros_like(batch[key]) if g is None else g for key, g in zip(LOGPS, expected_grads)}
    torch.testing.assert_close(output.loss.detach(), expected.detach(), rtol=1e-10, atol=1e-10)
    for key in LOGPS:
        torch.testing.assert_close(grads[key], expected_grads[key], rtol=1e-10, atol=1e-10, msg=key)
    paper = build_loss(name, weighting=weighting, alpha=diagonal_alpha, tau=tau)(**batch).loss
    if weighting == "diagonal":  # α inside vs outside the sigmoid: a different loss
        assert abs(paper.item() - output.loss.item()) > 1e-3
    else:
        torch.testing.assert_close(paper.detach(), output.loss.detach(), rtol=1e-12, atol=1e-12)


def test_authors_form_and_reference_columns_errors():
    with pytest.raises(LossConfigError, match="form='authors' .* needs weight_normalization='row', got 'mean'"):
        build_loss("rpo", form="authors", weight_normalization="mean")
    with pytest.raises(LossConfigError, match="option form must be one of 'paper', 'authors'"):
        build_loss("rpo", form="mine")
    with pytest.raises(LossConfigError, match="normalization_columns .K. goes with weight_normalization="
                                              "'reference_columns' only; got weight_normalization='row'"):
        build_loss("rpo", normalization_columns=8)
    with pytest.raises(LossConfigError, match="normalization_columns must be >= 1, got 0"):
        build_loss("rpo", weight_normalization="reference_columns", normalization_columns=0)
    with pytest.raises(LossInputError, match="weighting='diagonal' needs paired data"):
        build_loss("rpo", weighting="diagonal", form="authors")(**make_batch(3, 5, seed=21))
    with pytest.raises(LossInputError, match="weighting='diagonal' needs at least 2 pairs, got 1"):
        build_loss("rpo", weighting="diagonal", form="authors")(**make_batch(1, 1, seed=21))


@pytest.mark.parametrize("name", ["rpo", "simpo-rpo"])
def test_contrast_defaults_resolved_by_the_loss(name):
    """The defaults that depend on other options, as `Loss.options` reports them: a local matrix keeps the paper's
    rows, a global one (and `reference_columns` without K) has K = 8, the authors' per-GPU matrix, whatever else
    is set; the authors' form keeps rows; α only for the diagonal weighting."""
    resolved = lambda **options: tuple(build_loss(name, **options).options[key] for key in (  # noqa: E731
        "weight_normalization", "normalization_columns", "alpha"))
    assert resolved() == ("row", None, None)
    assert resolved(global_contrast=True) == ("reference_columns", 8, None)
    assert resolved(global_contrast=True, weighting="diagonal") == ("reference_columns", 8, 0.8)
    assert resolved(global_contrast=True, weighting="diagonal", form="authors") == ("row", None, 0.8)
    assert resolved(weight_normalization="reference_columns") == ("reference_columns", 8, None)
    assert resolved(global_contrast=True, weight_normalization="mean") == ("mean", None, None)
    assert resolved(global_contrast=True, normalization_columns=32, weight_normalization="reference_columns") == (
        "reference_columns", 32, None)
    # The global default is the 8-column scale: equal (1e-12) to the local loss with K = 8 given explicitly.
    batch = make_batch(6, 6, seed=3)
    torch.testing.assert_close(
        build_loss(name, global_contrast=True)(**batch).loss,  # no process group: the local matrix
        build_loss(name, weight_normalization="reference_columns", normalization_columns=8)(**batch).loss,
        rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("weighting", ["embedding", "uniform", "diagonal"])
def test_effective_beta_does_not_depend_on_the_matrix_size(weighting):
    """The mean effective β of a pair, β·mean ω_ij: with "mean" it is β, with "reference_columns" β/K, for 8 and
    for 64 columns alike (1e-6); with the paper's "row" it is β/N, so it shrinks with the matrix."""
    beta = 0.1
    per_size = {}
    for columns in (8, 64):
        batch = make_batch(columns, columns, seed=22)
        per_size[columns] = {
            normalization: metric(build_loss("rpo", weighting=weighting, weight_normalization=normalization,
                                             **options)(**batch), "contrast/effective_beta")
            for normalization, options in (("row", {}), ("mean", {}),
                                           ("reference_columns", {"normalization_columns": 4}))}
    for columns in (8, 64):
        assert per_size[columns]["mean"] == pytest.approx(beta, rel=1e-6, abs=1e-7)
        assert per_size[columns]["reference_columns"] == pytest.approx(beta / 4, rel=1e-6, abs=1e-7)
        assert per_size[columns]["row"] == pytest.approx(beta / columns, rel=1e-6)


@pytest.mark.parametrize("weighting,extreme", [("embedding", False), ("uniform", False), ("embedding", True)])
def test_rpo_z_value_and_gradient(weighting, extreme):
    """log Ẑ(x_i) = −(ρ_w,i + ρ_l,i)/2 (detached): scores a_i = h_i/2, b_j = −h_j/2 in value, so
    s_ij = ω_ij·β(h_i + h_j)/2; the gradient reaches ρ_w,i through a_i and ρ_l,j through b_j only."""
    rows, beta = 6, 0.1
    batch = make_batch(rows, rows, seed=9, extreme=extreme)
    output, grads = run(build_loss("rpo-z", weighting=weighting), batch)
    chosen, rejected = ratios(batch)
    h = chosen - rejected
    weights = dense_weights(rows, rows, weighting, batch["chosen_embeddings"], batch["rejected_embeddings"])
    expected, d_chosen, d_rejected, s = contrast_closed_form(h / 2, -h / 2, weights, beta)
    torch.testing.assert_close(s, weights * beta * (h[:, None] + h[None, :]) / 2, rtol=1e-12, atol=0)
    assert_matches(output, grads, expected, grads_from_ratios(d_chosen, d_rejected))
    assert metric(output, "rewards/chosen") == pytest.approx(beta * chosen.mean().item(), rel=1e-5, abs=1e-6)


def test_rpo_z_keeps_the_diagonal_and_needs_paired_data():
    batch = make_batch(5, 5, seed=10)
    z_output, z_grads = run(build_loss("rpo-z", weighting="diagonal", alpha=1.0), batch)
    plain_output, plain_grads = run(build_loss("rpo", weighting="diagonal", alpha=1.0), batch)
    torch.testing.assert_close(z_output.loss, plain_output.loss, rtol=1e-12, atol=1e-12)
    for key in LOGPS:
        torch.testing.assert_close(z_grads[key], plain_grads[key], rtol=1e-12, atol=1e-15)
    with pytest.raises(LossInputError, match="paired"):
        build_loss("rpo-z")(**make_batch(3, 5, seed=10))


@pytest.mark.parametrize("name", ["simpo-rpo", str(EXAMPLE_PLUGIN)])
@pytest.mark.parametrize("rows,columns,weighting,extreme", [
    (6, 6, "embedding", False), (4, 7, "embedding", False), (5, 3, "uniform", False), (6, 6, "embedding", True)])
def test_simpo_rpo_value_and_gradient(name, rows, columns, weighting, extreme):
    """Built-in simpo-rpo and the user-side plugin examples/simpo_rpo.py: a = log π_w/|y_w|, b = log π_l/|y_l|."""
    batch, beta, gamma = make_batch(rows, columns, seed=11, extreme=extreme), 2.0, 0.5
    loss = build_loss(name, weighting=weighting)
    assert not loss.needs_reference and not loss.needs_pairs
    output, grads = run(loss, batch)
    chosen_len, rejected_len = batch["chosen_lengths"].double(), batch["rejected_lengths"].double()
    weights = dense_weights(rows, columns, weighting, batch["chosen_embeddings"], batch["rejected_embeddings"])
    expected, d_a, d_b, _ = contrast_closed_form(batch["policy_chosen_logps"].detach() / chosen_len,
                                                 batch["policy_rejected_logps"].detach() / rejected_len,
                                                 weights, beta, gamma)
    expected_grads = {key: torch.zeros_like(batch[key]) for key in LOGPS}
    expected_grads["policy_chosen_logps"] = d_a / chosen_len
    expected_grads["policy_rejected_logps"] = d_b / rejected_len
    assert_matches(output, grads, expected, expected_grads)


# --- declarations ------------------------------------------------------------------------------------------------

POLICY_REF = set(LOGPS)
EMBEDDINGS = {"chosen_embeddings", "rejected_embeddings"}
LENGTHS = {"chosen_lengths", "rejected_lengths"}


@pytest.mark.parametrize("name,options,requires,pairs,reference", [
    ("dpo", {}, POLICY_REF, True, True),
    ("ipo", {}, POLICY_REF, True, True),
    ("ipo", {"length_normalized": True}, POLICY_REF | LENGTHS, True, True),
    ("simpo", {}, {"policy_chosen_logps", "policy_rejected_logps"} | LENGTHS, True, False),
    ("kto", {}, POLICY_REF, False, True),
    ("sft", {}, {"policy_chosen_logps", "chosen_lengths"}, False, False),
    ("rpo", {}, POLICY_REF | EMBEDDINGS, False, True),
    ("rpo", {"weighting": "uniform"}, POLICY_REF, False, True),
    ("rpo", {"weighting": "diagonal"}, POLICY_REF, True, True),
    ("rpo-z", {"weighting": "uniform"}, POLICY_REF, True, True),
    ("simpo-rpo", {}, {"policy_chosen_logps", "policy_rejected_logps"} | LENGTHS | EMBEDDINGS, False, False),
    ("rpo+0.2*sft", {"weighting": "none"}, POLICY_REF | {"chosen_lengths"}, False, True),
    ("simpo+sft", {}, {"policy_chosen_logps", "policy_rejected_logps"} | LENGTHS, True, False),
])
def test_declared_requirements(name, options, requires, pairs, reference):
    loss = build_loss(name, **options)
    assert loss.requires == requires
    assert loss.needs_pairs is pairs
    assert loss.needs_reference is reference
    if pairs:  # refused for unpaired data, naming the term
        term = next(term_name for term_name, _, term in loss.terms if term.needs_pairs)
        with pytest.raises(LossConfigError, match=f"loss '{term}' needs paired data"):
            resolve_loss(name, options, paired=False)
    else:
        assert resolve_loss(name, options, paired=False).name == loss.name


def test_global_and_embedding_declarations():
    """What the trainer reads instead of a loss's internals: is_global (also through a combination's term),
    needs_embeddings; a combination without a global term has global_loss None."""
    assert build_loss("rpo", global_contrast=True).is_global and not build_loss("rpo").is_global
    assert build_loss("rpo+0.2*sft", global_contrast=True).is_global
    assert not build_loss("dpo+0.2*sft").is_global and not build_loss("simpo-rpo").is_global
    assert build_loss("rpo").needs_embeddings and build_loss("simpo-rpo+sft").needs_embeddings
    assert not build_loss("rpo", weighting="diagonal").needs_embeddings and not build_loss("dpo").needs_embeddings
    assert build_loss("dpo+0.2*sft")(**make_batch(3, 3, seed=23)).global_loss is None


def test_available_losses_lists_the_built_ins():
    assert set(BUILT_INS) <= set(available_losses())
    assert build_loss("kto").optional == {"kl_policy_logps", "kl_reference_logps", "process_group"}
    assert build_loss("rpo", global_contrast=True).optional == {"process_group"}


# --- errors ------------------------------------------------------------------------------------------------------

def test_unknown_name_lists_the_registered_losses():
    with pytest.raises(LossConfigError, match=r"unknown loss 'rpoo'\. Did you mean 'rpo'") as error:
        build_loss("rpoo")
    for name in BUILT_INS:
        assert name in str(error.value)
    with pytest.raises(LossConfigError, match="cannot import module 'no_such_module_for_rpo'"):
        build_loss("no_such_module_for_rpo:loss")
    with pytest.raises(LossConfigError, match="not found"):
        build_loss("no/such/plugin.py")


@pytest.mark.parametrize("name,options,pattern", [
    ("rpo", {"betta": 0.1}, r"no option 'betta' \(did you mean beta\?\); its options are: beta=0.1, "
                            r"weighting='embedding'"),
    ("sft", {"beta": 0.1}, r"no option 'beta'; its options are: \(none\)"),
    ("rpo", {"weighting": "cosine"}, r"weighting must be one of 'embedding', 'uniform', 'diagonal', 'none'"),
    ("rpo", {"weight_normalization": "col"}, r"weight_normalization must be one of 'row', 'mean'"),
    ("rpo", {"beta": 0.0}, r"beta must be > 0"),
    ("rpo", {"tau": -1.0}, r"tau must be > 0"),
    ("rpo", {"alpha": 1.5, "weighting": "diagonal"}, r"alpha must be in \[0.0, 1.0\]"),
    ("rpo", {"alpha": 0.5}, r"option alpha applies to weighting='diagonal' only, got weighting='embedding'"),
    ("dpo", {"label_smoothing": 0.5}, r"label_smoothing must be in \[0.0, 0.5\)"),
    ("kto", {"desirable_weight": -1.0}, r"desirable_weight must be >= 0"),
    ("dpo", {"beta": "abc"}, r"option beta expects float, got 'abc'"),
    ("rpo", {"global_contrast": "maybe"}, r"option global_contrast expects bool"),
    ("dpo", {"beta": True}, r"option beta expects float, got True"),
])
def test_invalid_options_name_the_option_and_valid_values(name, options, pattern):
    with pytest.raises(LossConfigError, match=pattern):
        build_loss(name, **options)


def test_string_options_from_a_command_line_are_converted():
    loss = build_loss("rpo", beta="0.2", global_contrast="true", tau=1)
    assert loss.options["beta"] == 0.2 and loss.options["global_contrast"] is True and loss.options["tau"] == 1.0
    assert isinstance(loss.options["tau"], float)


def test_batch_errors_name_the_keyword():
    batch = make_batch(4, 4, seed=12)
    no_embeddings = {k: v for k, v in batch.items() if k != "chosen_embeddings"}
    with pytest.raises(LossInputError, match="needs batch keyword\\(s\\) 'chosen_embeddings'"):
        build_loss("rpo")(**no_embeddings)
    with pytest.raises(LossInputError, match="'chosen_lengths', 'rejected_lengths'"):
        build_loss("simpo")(**{k: v for k, v in batch.items() if "lengths" not in k})
    with pytest.raises(LossInputError, match="'reference_chosen_logps' \\(missing or None\\)"):
        build_loss("dpo")(**{**batch, "reference_chosen_logps": None})
    with pytest.raises(LossInputError, match="unknown batch keyword\\(s\\) 'policy_chosen_logp'; valid: "):
        build_loss("dpo")(**batch, policy_chosen_logp=batch["policy_chosen_logps"])
    with pytest.raises(LossInputError, match="'reference_chosen_logps' has 3 rows but 'policy_chosen_logps' has 4"):
        build_loss("dpo")(**{**batch, "reference_chosen_logps": batch["reference_chosen_logps"][:3]})
    with pytest.raises(LossInputError, match="'chosen_embeddings' must have shape \\[M, D\\]"):
        build_loss("rpo")(**{**batch, "chosen_embeddings": batch["chosen_embeddings"][0]})
    lengths = batch["chosen_lengths"].clone()
    lengths[2] = 0
    with pytest.raises(LossInputError, match="'chosen_lengths' must be > 0 .*row 2 is 0"):
        build_loss("sft")(**{**batch, "chosen_lengths": lengths})
    unpaired = make_batch(3, 5, seed=12)
    for name in ("dpo", "ipo", "simpo"):
        with pytest.raises(LossInputError, match=f"loss '{name}' needs paired data .* 3 chosen and 5 rejected"):
            build_loss(name)(**unpaired)
    with pytest.raises(LossInputError, match="weighting='diagonal' needs paired data"):
        build_loss("rpo", weighting="diagonal")(**unpaired)


# --- user losses -------------------------------------------------------------------------------------------------

def hinge_closed_form(batch, beta, margin):
    chosen, rejected = ratios(batch)
    logits = beta * (chosen - rejected)
    active = (margin - logits > 0).double()
    d_chosen = -beta * active / chosen.numel()
    return torch.clamp(margin - logits, min=0).mean(), grads_from_ratios(d_chosen, -d_chosen)


def test_custom_loss_from_a_module_by_name(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGINS))
    batch = make_batch(5, 5, seed=13)
    for spec in ("rpo_test_plugin_losses:hinge_dpo", "rpo_test_plugin_losses:test-hinge-dpo"):
        loss = build_loss(spec, beta=2.0, margin=1.0)
        assert loss.name == "test-hinge-dpo" and loss.needs_reference
        output, grads = run(loss, batch)
        assert_matches(output, grads, *hinge_closed_form(batch, 2.0, 1.0))
        assert "hinge/active" in output.metrics
    # Once imported, the registered name works on its own (e.g. in a combination).
    assert "test-hinge-dpo" in available_losses()
    # An unregistered factory: requires are read from the loss callable's signature.
    loss = build_loss("rpo_test_plugin_losses:unregistered_margin_loss", weight=3.0)
    assert loss.name == "rpo_test_plugin_losses:unregistered_margin_loss"
    assert loss.requires == {"policy_chosen_logps", "policy_rejected_logps"} and not loss.needs_reference
    output = loss(**batch)
    expected = 3.0 * (batch["policy_rejected_logps"].mean() - batch["policy_chosen_logps"].mean())
    torch.testing.assert_close(output.loss, expected, rtol=RTOL, atol=ATOL)
    with pytest.raises(LossConfigError, match="no loss factory or registered loss named 'nope'"):
        build_loss("rpo_test_plugin_losses:nope")


def test_custom_loss_from_a_plugin_file():
    plugin = PLUGINS / "rpo_test_plugin_losses.py"
    with pytest.raises(LossConfigError, match="registers 2 losses \\(test-chosen-nll, test-hinge-dpo\\); pick one"):
        build_loss(str(plugin))
    loss = build_loss(f"{plugin}:test-chosen-nll", scale=2.0)
    assert loss.requires == {"policy_chosen_logps"} and loss.optional == {"chosen_lengths"}
    batch = make_batch(4, 2, seed=14)
    output, grads = run(loss, batch)
    expected_grads = {key: torch.zeros_like(batch[key]) for key in LOGPS}
    expected_grads["policy_chosen_logps"] = torch.full((4,), -2.0 / 4, dtype=torch.float64)
    assert_matches(output, grads, -2.0 * batch["policy_chosen_logps"].detach().mean(), expected_grads)
    assert metric(output, "nll/constant") == 1.5  # a Python float metric becomes a float32 0-dim tensor
    # The example plugin registers exactly one loss, so its path alone names it.
    example = build_loss(str(EXAMPLE_PLUGIN))
    assert example.name == "my-simpo-rpo" and not example.needs_reference
    with pytest.raises(LossConfigError, match="loss 'my-simpo-rpo': my-simpo-rpo: beta and tau must be > 0"):
        build_loss(f"{EXAMPLE_PLUGIN}:my-simpo-rpo", beta=-1.0)
    with pytest.raises(LossConfigError, match="weighting must be one of 'embedding', 'uniform', 'none'; got 'diag"):
        build_loss(str(EXAMPLE_PLUGIN), weighting="diagonal")


def test_plugin_file_errors(tmp_path):
    clash = tmp_path / "clash.py"
    clash.write_text("from rpo.losses import register_loss\n\n@register_loss('dpo')\ndef mine():\n    return None\n")
    with pytest.raises(LossConfigError, match="clash.py' failed: LossConfigError: loss name 'dpo' is already "
                                              "registered by rpo.losses.separable.DPOLoss"):
        build_loss(str(clash))
    broken = tmp_path / "broken.py"
    broken.write_text("def oops(:\n")
    with pytest.raises(LossConfigError, match="broken.py' failed: SyntaxError"):
        build_loss(str(broken))
    empty = tmp_path / "empty.py"
    empty.write_text("X = 1\n")
    with pytest.raises(LossConfigError, match="registers 0 losses \\(none: decorate a factory"):
        build_loss(str(empty))


def test_register_loss_inline_and_conflicts():
    @register_loss("test-inline-sum")
    def factory(scale: float = 1.0):
        def loss(*, policy_chosen_logps, chosen_embeddings=None):
            return LossOutput(scale * policy_chosen_logps.sum(), {"count": policy_chosen_logps.numel()})
        return loss

    loss = build_loss("test-inline-sum", scale=0.5)
    assert loss.requires == {"policy_chosen_logps"} and not loss.is_global and not loss.needs_pairs
    assert loss.optional == {"chosen_embeddings"}
    batch = make_batch(3, 3, seed=15)
    assert metric(loss(**batch), "count") == 3.0
    register_loss("test-inline-sum")(factory)  # the same factory again: not a conflict

    def other():
        return None

    with pytest.raises(LossConfigError, match="'test-inline-sum' is already registered by .*factory"):
        register_loss("test-inline-sum")(other)
    with pytest.raises(LossConfigError, match="invalid loss name 'a\\+b'"):
        register_loss("a+b")

    @register_loss("test-bad-output")
    def bad_output():
        return lambda *, policy_chosen_logps: policy_chosen_logps.sum()

    with pytest.raises(LossInputError, match="returned Tensor; a loss callable must return rpo.losses.LossOutput"):
        build_loss("test-bad-output")(**batch)


# --- combinations ------------------------------------------------------------------------------------------------

def test_combination_string_value_gradient_and_metrics():
    batch, beta = make_batch(5, 5, seed=16), 0.2
    loss = build_loss("rpo+0.2*sft", beta=beta, weighting="uniform")  # beta/weighting go to rpo, the only taker
    assert loss.name == "rpo+0.2*sft" and loss.needs_reference and not loss.is_global
    output, grads = run(loss, batch)
    chosen, rejected = ratios(batch)
    rpo_value, d_chosen, d_rejected, _ = contrast_closed_form(chosen, rejected, dense_weights(5, 5, "uniform"), beta)
    tokens = batch["chosen_lengths"].double().sum()
    sft_value = -batch["policy_chosen_logps"].detach().sum() / tokens
    expected_grads = grads_from_ratios(d_chosen, d_rejected)
    expected_grads["policy_chosen_logps"] = expected_grads["policy_chosen_logps"] - 0.2 / tokens
    assert_matches(output, grads, rpo_value + 0.2 * sft_value, expected_grads)
    assert metric(output, "loss/rpo") == pytest.approx(rpo_value.item(), rel=1e-6)
    assert metric(output, "loss/sft") == pytest.approx(sft_value.item(), rel=1e-6)
    assert {"rewards/accuracies", "contrast/effective_beta", "sft/nll_per_token"} <= set(output.metrics)


def test_combination_list_forms_and_per_term_options():
    batch = make_batch(4, 4, seed=17)
    chosen, rejected = ratios(batch)
    dpo_value = nls(0.3 * (chosen - rejected)).mean()
    sft_value = -batch["policy_chosen_logps"].detach().sum() / batch["chosen_lengths"].double().sum()
    for spec, options in [
        ([["dpo", 1.0], ["sft", 0.5]], {"beta": 0.3}),
        ([("dpo", 1, {"beta": 0.3}), ("sft", 0.5)], {}),
        ([{"name": "dpo", "options": {"beta": 0.3}}, {"name": "sft", "weight": 0.5}], {}),
        ("dpo+5e-1*sft", {"dpo": {"beta": 0.3}}),
    ]:
        loss = build_loss(spec, **options)
        assert loss.name == "dpo+0.5*sft" and loss.needs_pairs
        torch.testing.assert_close(loss(**batch).loss.detach(), dpo_value + 0.5 * sft_value, rtol=RTOL, atol=ATOL)
    single = build_loss("1e-1*sft")
    torch.testing.assert_close(single(**batch).loss.detach(), 0.1 * sft_value, rtol=RTOL, atol=ATOL)


def test_combination_metric_collisions_are_prefixed():
    batch = make_batch(4, 4, seed=18)
    output = build_loss("dpo+0.5*rpo", weighting="uniform")(**batch)  # beta 0.1 (default) for both
    assert metric(output, "rewards/chosen") == pytest.approx(metric(output, "rpo/rewards/chosen"))
    assert "contrast/diag_weight" in output.metrics and "loss/dpo" in output.metrics


@pytest.mark.parametrize("spec,options,pattern", [
    ("rpo+", {}, r"cannot parse loss combination 'rpo\+'"),
    ("rpo+0.2*sft*2", {}, r"cannot parse loss combination"),
    ("dpo+0.5*dpo", {}, r"term dpo appears more than once"),
    ("dpo+0.2*sft", {"tau": 0.5}, r"no term has option 'tau'\. Term options: dpo: beta, label_smoothing; sft: "),
    ("dpo+0.2*nosuchloss", {}, r"unknown loss 'nosuchloss'"),
    ([["dpo", "heavy"]], {}, r"term 0 \(dpo\): the weight must be a number"),
    ([], {}, r"at least one term"),
])
def test_combination_errors(spec, options, pattern):
    with pytest.raises(LossConfigError, match=pattern):
        build_loss(spec, **options)


# --- global contrast ---------------------------------------------------------------------------------------------

def test_global_contrast_passes_the_process_group(monkeypatch, tmp_path):
    """global_contrast=True with a process group takes rpo.distributed's global matrix; without either, the local
    rpo.ops.contrast_loss. With a 1-process gloo group the global loss equals the local one (the same
    normalisation named: a global matrix's default is another one, see test_contrast_defaults_resolved_by_the_loss)."""
    seen = []
    real_local, real_global = rpo.ops.contrast_loss, rpo.distributed.global_contrast_loss_and_columns

    def recording_local(*args, **kwargs):
        seen.append("local")
        return real_local(*args, **kwargs)

    def recording_global(*args, **kwargs):
        seen.append(kwargs["process_group"])
        return real_global(*args, **kwargs)

    monkeypatch.setattr(rpo.ops, "contrast_loss", recording_local)
    monkeypatch.setattr(rpo.distributed, "global_contrast_loss_and_columns", recording_global)
    assert not dist.is_initialized(), "another test left a default process group behind"
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        batch = make_batch(4, 6, seed=19)
        local_output, local_grads = run(build_loss("rpo"), batch)
        global_output, global_grads = run(build_loss("rpo", global_contrast=True, weight_normalization="row"),
                                          {**batch, "process_group": group})
        ignored = build_loss("rpo")(**batch, process_group=group)
        combined = build_loss("0.5*rpo+0.2*sft", global_contrast=True, weight_normalization="row")(
            **batch, process_group=group)
    finally:
        dist.destroy_process_group()
    assert seen == ["local", group, "local", group]
    assert local_output.global_loss is None and ignored.global_loss is None
    assert global_output.global_loss is global_output.loss
    # A combination: the global part is weight × rpo's loss, the rest the separable sft term.
    sft_value = -batch["policy_chosen_logps"].detach().sum() / batch["chosen_lengths"].double().sum()
    torch.testing.assert_close(combined.global_loss.detach(), 0.5 * local_output.loss.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close((combined.loss - combined.global_loss).detach(), 0.2 * sft_value, rtol=1e-12, atol=0)
    torch.testing.assert_close(global_output.loss, local_output.loss, rtol=1e-12, atol=1e-12)
    for key in LOGPS:
        torch.testing.assert_close(global_grads[key], local_grads[key], rtol=1e-12, atol=1e-15)
    for name, value in local_output.metrics.items():
        torch.testing.assert_close(global_output.metrics[name], value, msg=name)


def test_batch_keywords_are_the_documented_set():
    assert set(BATCH_KEYWORDS) == {
        "policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps",
        "chosen_lengths", "rejected_lengths", "chosen_embeddings", "rejected_embeddings", "kl_policy_logps",
        "kl_reference_logps", "process_group", "chosen_tokens_per_row"}

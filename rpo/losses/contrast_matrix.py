"""Contrast-matrix losses, which couple the rows of the batch: rpo, rpo-z, simpo-rpo.

Every chosen answer i is contrasted with every rejected answer j:
    L = −1/(M·N) Σ_ij log σ(ω_ij·(β(a_i − b_j) − margin))                       (form="paper")
these losses only choose the scores a (chosen) and b (rejected). The loss decides where the matrix is computed:
the local batch through `rpo.ops.contrast_loss`, or — with global_contrast=True and a process group in the
batch — the global batch of the group through `rpo.distributed.global_contrast_loss`. The contrast/* metrics
describe the same matrix (see rpo.losses.contrast_metrics).

form="authors" is the authors' code: the same for "embedding", "uniform" and "none" weighting (row
normalisation), but for "diagonal" α weighs the per-pair losses outside the sigmoid:
    L = α·mean_i nls(β(a_i − b_i) − m) + (1−α)·mean_i mean_{j≠i} nls(β(a_i − b_j) − m),   nls = −log σ.
weight_normalization="reference_columns" makes every row sum to N/K (K = normalization_columns): each pair
weighs what it weighs in a row-normalised K-column matrix, whatever the (global) N. Equations: docs/losses.md.

Defaults that depend on other options, resolved here and reported in `Loss.options`: the weight normalisation is
the paper's "row" for a local matrix (and for the authors' form) and "reference_columns" with
K = DEFAULT_NORMALIZATION_COLUMNS for a global one, so that a global matrix's effective β depends on neither its
size nor the run's layout (docs/global-contrast.md); α is DEFAULT_ALPHA and applies to "diagonal" only.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F

from rpo import distributed, ops
from rpo.losses.base import (EMBEDDING_KEYWORDS, LossConfigError, LossInputError, LossOutput, PreferenceLoss,
                             check_paired, check_positive, check_range)
from rpo.losses.contrast_metrics import all_reduce_sums, contrast_metrics, contrast_sums
from rpo.losses.registry import register_loss

# K of "reference_columns" when none is given: the authors' per-GPU matrix (64 pairs on 8 GPUs: 8 columns), so
# every pair of a global matrix keeps the effective β it has in their recipe, β/8, at any layout and global batch.
DEFAULT_NORMALIZATION_COLUMNS = 8
DEFAULT_ALPHA = 0.8

Weighting = Literal["embedding", "uniform", "diagonal", "none"]
WeightNormalization = Literal["row", "mean", "reference_columns"]
Form = Literal["paper", "authors"]


class ContrastMatrixLoss(PreferenceLoss):
    """Shared options, checks and the choice of the local or global matrix; subclasses choose the scores."""

    name = "contrast"

    def _configure(self, *, beta: float, weighting: str, tau: float, alpha: Optional[float],
                   weight_normalization: Optional[str], margin: float, global_contrast: bool, form: str,
                   normalization_columns: Optional[int], reference_free: bool = False,
                   per_token: bool = False) -> None:
        self._set_scores(beta, reference_free=reference_free, per_token=per_token)
        check_positive(self.name, "tau", tau)
        if alpha is not None:
            if weighting != "diagonal":
                raise LossConfigError(f"loss {self.name!r}: option alpha applies to weighting='diagonal' only, got "
                                      f"weighting={weighting!r}", option="alpha")
            check_range(self.name, "alpha", alpha, 0.0, 1.0, high_inclusive=True)
        if weight_normalization is None:
            global_default = global_contrast and form != "authors"
            weight_normalization = "reference_columns" if global_default else "row"
        if weight_normalization == "reference_columns" and normalization_columns is None:
            normalization_columns = DEFAULT_NORMALIZATION_COLUMNS
        if normalization_columns is not None and weight_normalization != "reference_columns":
            raise LossConfigError(f"loss {self.name!r}: option normalization_columns (K) goes with "
                                  f"weight_normalization='reference_columns' only; got "
                                  f"weight_normalization={weight_normalization!r}", option="normalization_columns")
        if normalization_columns is not None and normalization_columns < 1:
            raise LossConfigError(f"loss {self.name!r}: option normalization_columns must be >= 1, got "
                                  f"{normalization_columns!r}", option="normalization_columns")
        if form == "authors" and weight_normalization != "row":
            raise LossConfigError(f"loss {self.name!r}: form='authors' is the authors' code, which normalises the "
                                  f"rows; it needs weight_normalization='row', got {weight_normalization!r}",
                                  option="weight_normalization")
        self.alpha = DEFAULT_ALPHA if alpha is None else alpha
        self.weighting, self.tau, self.margin, self.form = weighting, tau, margin, form
        self.weight_normalization, self.normalization_columns = weight_normalization, normalization_columns
        self.global_contrast = self.is_global = global_contrast
        self.needs_pairs = type(self).needs_pairs or weighting == "diagonal"
        self.options = dict(alpha=self.alpha if weighting == "diagonal" else None,
                            weight_normalization=weight_normalization, normalization_columns=normalization_columns)
        if weighting == "embedding":
            self.requires = self.requires | EMBEDDING_KEYWORDS
        self.optional = frozenset({"process_group"}) if global_contrast else frozenset()

    def contrast_scores(self, chosen, rejected):
        """The scores (a, b) the matrix compares, from the implicit-reward scores (default: themselves)."""
        return chosen, rejected

    def _matrix(self):
        """(op options, metric options): what the op and the metrics are called with.

        "reference_columns" is the op's "mean" (rows sum to N) with β and margin divided by K:
        ω·N/K·(βΔ − m) = ω·N·(βΔ/K − m/K). The authors' diagonal form has no weight in the sigmoid ("none").
        """
        weighting, normalization, scale = self.weighting, self.weight_normalization, 1.0
        if self.form == "authors" and weighting == "diagonal":
            weighting = "none"
        if normalization == "reference_columns":
            normalization = "mean"
            scale = 1.0 if weighting == "none" else 1.0 / self.normalization_columns
        op = dict(beta=self.beta * scale, margin=self.margin * scale, weighting=weighting, tau=self.tau,
                  alpha=self.alpha, weight_normalization=normalization)
        metrics = dict(weighting=weighting, weight_normalization=normalization, weight_scale=scale, tau=self.tau,
                       alpha=self.alpha)
        return op, metrics

    def score_loss(self, chosen, rejected, batch) -> LossOutput:
        a, b = self.contrast_scores(chosen, rejected)
        process_group = batch.get("process_group") if self.global_contrast else None
        embedding = self.weighting == "embedding"
        chosen_embeddings = batch["chosen_embeddings"] if embedding else None
        rejected_embeddings = batch["rejected_embeddings"] if embedding else None
        op_options, metric_options = self._matrix()
        if process_group is None:
            if self.weighting == "diagonal" and a.shape != b.shape:
                raise LossInputError(f"loss {self.name!r}: weighting='diagonal' needs paired data (M == N), got "
                                     f"{a.shape[0]} chosen and {b.shape[0]} rejected rows")
            loss = ops.contrast_loss(a, b, chosen_embeddings=chosen_embeddings,
                                     rejected_embeddings=rejected_embeddings, **op_options)
            sums = contrast_sums(a, b, chosen_embeddings=chosen_embeddings, rejected_embeddings=rejected_embeddings,
                                 **metric_options)
            rows, global_loss = a.shape[0], None
        else:
            # The global matrix: this rank's rows × every rank's columns; its metrics are reduced over the group.
            loss, columns = distributed.global_contrast_loss_and_columns(
                a, b, process_group=process_group, chosen_embeddings=chosen_embeddings,
                rejected_embeddings=rejected_embeddings, **op_options)
            sums = all_reduce_sums(contrast_sums(a, columns.rejected_scores, chosen_embeddings=chosen_embeddings,
                                                 rejected_embeddings=columns.rejected_embeddings,
                                                 diag_offset=columns.row_offset, **metric_options), process_group)
            rows, global_loss = columns.global_rows, loss
            if self.form == "authors" and self.weighting == "diagonal" and any(
                    m != n for m, n in columns.shard_sizes):
                # Every rank holds the same table, so every rank raises here (after the collectives, no hang).
                raise LossInputError(f"loss {self.name!r}: form='authors' with weighting='diagonal' over a process "
                                     f"group needs every rank's answers in pairs (M_r == N_r); per rank (M_r, N_r): "
                                     f"{list(columns.shard_sizes)}")
        metrics = contrast_metrics(sums, self.beta)
        if self.form == "authors" and self.weighting == "diagonal":
            loss, global_loss = self._authors_diagonal(a, b, loss, rows, global_loss is not None)
        return LossOutput(loss, metrics, global_loss=global_loss)

    def _authors_diagonal(self, a, b, all_pairs_loss, rows, is_global):
        """The authors' diagonal form from the mean over all pairs of nls(β(a_i − b_j) − m) (`all_pairs_loss`,
        local or global over M = `rows` rows) and this rank's diagonal pairs d_i = nls(β(a_i − b_i) − m):
            L = α·mean_i d_i + (1−α)/(M(M−1))·(M²·all_pairs_loss − Σ_i d_i)
              = (1−α)·M/(M−1)·all_pairs_loss  +  (α − (1−α)/(M−1))·mean_i d_i.
        The first term is global for a global matrix; the second is a mean over this rank's pairs (the separable
        part of `LossOutput`). Returns (loss, global part or None)."""
        if rows < 2:  # `rows` is global for a global matrix: every rank raises together
            raise LossInputError(f"loss {self.name!r}: weighting='diagonal' needs at least 2 pairs, got {rows}")
        dtype = torch.promote_types(a.dtype, torch.float32)
        diagonal = F.softplus(-(self.beta * (a.to(dtype) - b.to(dtype)) - self.margin))
        diagonal_mean = diagonal.sum() / max(1, a.shape[0])
        shared = (1.0 - self.alpha) * rows / (rows - 1) * all_pairs_loss
        loss = (shared + (self.alpha - (1.0 - self.alpha) / (rows - 1)) * diagonal_mean).to(a.dtype)
        return loss, (shared if is_global else None)


@register_loss("rpo")
class RPOLoss(ContrastMatrixLoss):
    """RPO: scores a_i = ρ_chosen,i, b_j = ρ_rejected,j (log π_θ − log π_ref), the paper's contrast matrix."""

    name = "rpo"

    def __init__(self, beta: float = 0.1, weighting: Weighting = "embedding", tau: float = 0.5,
                 alpha: Optional[float] = None, weight_normalization: Optional[WeightNormalization] = None,
                 margin: float = 0.0, global_contrast: bool = False, form: Form = "paper",
                 normalization_columns: Optional[int] = None):
        self._configure(beta=beta, weighting=weighting, tau=tau, alpha=alpha,
                        weight_normalization=weight_normalization, margin=margin, global_contrast=global_contrast,
                        form=form, normalization_columns=normalization_columns)


@register_loss("rpo-z")
class RPOZLoss(RPOLoss):
    """RPO with a per-prompt log Z(x) estimate added to every score (paired data only).

    The implicit reward is r(x, y) = β(ρ(x, y) + log Z(x)); log Z cancels on the diagonal but not across prompts.
    Anchoring each prompt's reward so that the reference model's answers score 0 on average gives
    log Z(x) = KL(π_ref(·|x) ‖ π_θ(·|x)), estimated from the prompt's two answers in the batch:
    log Ẑ(x_i) = −(ρ_chosen,i + ρ_rejected,i)/2, detached. Scores a_i = ρ_chosen,i + log Ẑ(x_i),
    b_j = ρ_rejected,j + log Ẑ(x_j); the diagonal (DPO) terms are unchanged.
    """

    name = "rpo-z"
    needs_pairs = True

    def contrast_scores(self, chosen, rejected):
        check_paired(self.name, chosen, rejected)
        # A baseline, not a path for gradients: it keeps the diagonal gradient exactly DPO's.
        log_z = (-0.5 * (chosen + rejected)).detach()
        return chosen + log_z, rejected + log_z


@register_loss("simpo-rpo")
class SimPORPOLoss(ContrastMatrixLoss):
    """SimPO scores in the contrast matrix (the paper's Appendix B): a_i = log π(y_w,i)/|y_w,i|,
    b_j = log π(y_l,j)/|y_l,j|, margin γ; no reference model."""

    name = "simpo-rpo"

    def __init__(self, beta: float = 2.0, margin: float = 0.5, weighting: Weighting = "embedding", tau: float = 0.5,
                 alpha: Optional[float] = None, weight_normalization: Optional[WeightNormalization] = None,
                 global_contrast: bool = False, form: Form = "paper", normalization_columns: Optional[int] = None):
        self._configure(beta=beta, weighting=weighting, tau=tau, alpha=alpha,
                        weight_normalization=weight_normalization, margin=margin, global_contrast=global_contrast,
                        form=form, normalization_columns=normalization_columns, reference_free=True,
                        per_token=True)

// Device-independent part of rpo::contrast_loss_terms (see contrast_loss.h).
#include "contrast_loss.h"

#include <ATen/ATen.h>

#include <cmath>

#include "kernels/contrast_math.h"

namespace rpo {
namespace ops {

using kernels::kDiagonal;
using kernels::kEmbedding;
using kernels::kMeanNormalization;
using kernels::kNone;
using kernels::kRowNormalization;

ContrastOptions make_options(double beta, double margin, double tau, double alpha, int64_t weighting,
                             int64_t normalization, int64_t diag_offset, double loss_scale, bool compute_grad) {
  return ContrastOptions{beta, margin, tau, alpha, weighting, normalization, diag_offset, loss_scale, compute_grad};
}

at::ScalarType accumulate_type(at::ScalarType score_type) {
  return score_type == at::kDouble ? at::kDouble : at::kFloat;
}

void check_contrast_args(const at::Tensor& chosen, const at::Tensor& rejected,
                         const std::optional<at::Tensor>& chosen_emb, const std::optional<at::Tensor>& rejected_emb,
                         const ContrastOptions& options) {
  TORCH_CHECK(chosen.dim() == 1, "rpo::contrast_loss_terms: chosen must be 1-D, got shape ", chosen.sizes());
  TORCH_CHECK(rejected.dim() == 1, "rpo::contrast_loss_terms: rejected must be 1-D, got shape ", rejected.sizes());
  TORCH_CHECK(chosen.scalar_type() == rejected.scalar_type(),
              "rpo::contrast_loss_terms: chosen and rejected must have the same dtype, got ", chosen.scalar_type(),
              " and ", rejected.scalar_type());
  const auto dtype = chosen.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
              "rpo::contrast_loss_terms: scores must be float32, bfloat16 or float64, got ", dtype);
  TORCH_CHECK(chosen.device() == rejected.device(), "rpo::contrast_loss_terms: chosen is on ", chosen.device(),
              " but rejected is on ", rejected.device());
  TORCH_CHECK(options.weighting >= kEmbedding && options.weighting <= kNone,
              "rpo::contrast_loss_terms: weighting must be 0 (embedding), 1 (uniform), 2 (diagonal) or 3 (none), got ",
              options.weighting);
  TORCH_CHECK(options.normalization == kRowNormalization || options.normalization == kMeanNormalization,
              "rpo::contrast_loss_terms: normalization must be 0 (row) or 1 (mean), got ", options.normalization);
  TORCH_CHECK(std::isfinite(options.beta), "rpo::contrast_loss_terms: beta must be finite, got ", options.beta);
  TORCH_CHECK(std::isfinite(options.margin), "rpo::contrast_loss_terms: margin must be finite, got ", options.margin);
  TORCH_CHECK(std::isfinite(options.loss_scale), "rpo::contrast_loss_terms: loss_scale must be finite, got ",
              options.loss_scale);
  const int64_t num_rows = chosen.size(0);
  const int64_t num_cols = rejected.size(0);
  if (options.weighting == kEmbedding) {
    TORCH_CHECK(std::isfinite(options.tau) && options.tau > 0,
                "rpo::contrast_loss_terms: tau must be finite and > 0, got ", options.tau);
    TORCH_CHECK(chosen_emb.has_value() && rejected_emb.has_value(),
                "rpo::contrast_loss_terms: the embedding weighting needs chosen_emb and rejected_emb");
    const auto& e = *chosen_emb;
    const auto& f = *rejected_emb;
    TORCH_CHECK(e.dim() == 2 && f.dim() == 2, "rpo::contrast_loss_terms: embeddings must be 2-D, got shapes ",
                e.sizes(), " and ", f.sizes());
    TORCH_CHECK(e.size(0) == num_rows, "rpo::contrast_loss_terms: chosen_emb has ", e.size(0), " rows but chosen has ",
                num_rows, " scores");
    TORCH_CHECK(f.size(0) == num_cols, "rpo::contrast_loss_terms: rejected_emb has ", f.size(0),
                " rows but rejected has ", num_cols, " scores");
    TORCH_CHECK(e.size(1) == f.size(1), "rpo::contrast_loss_terms: embedding dims differ: ", e.size(1), " vs ",
                f.size(1));
    TORCH_CHECK(at::isFloatingType(e.scalar_type()) && at::isFloatingType(f.scalar_type()),
                "rpo::contrast_loss_terms: embeddings must be floating point, got ", e.scalar_type(), " and ",
                f.scalar_type());
    TORCH_CHECK(e.device() == chosen.device() && f.device() == chosen.device(),
                "rpo::contrast_loss_terms: embeddings must be on the scores' device ", chosen.device());
  }
  if (options.weighting == kDiagonal && num_rows > 0) {
    TORCH_CHECK(options.alpha >= 0 && options.alpha <= 1, "rpo::contrast_loss_terms: alpha must be in [0, 1], got ",
                options.alpha);
    TORCH_CHECK(num_cols >= 2, "rpo::contrast_loss_terms: the diagonal weighting needs at least 2 columns, got ",
                num_cols);
    TORCH_CHECK(options.diag_offset >= 0 && options.diag_offset + num_rows <= num_cols,
                "rpo::contrast_loss_terms: diagonal columns diag_offset + i must lie in [0, ", num_cols,
                ") for all ", num_rows, " rows, got diag_offset ", options.diag_offset);
  }
}

PreparedInputs prepare_inputs(const at::Tensor& chosen, const at::Tensor& rejected,
                              const std::optional<at::Tensor>& chosen_emb,
                              const std::optional<at::Tensor>& rejected_emb, const ContrastOptions& options,
                              bool scores_in_accumulate_type) {
  const auto acc = accumulate_type(chosen.scalar_type());
  PreparedInputs p;
  p.num_rows = chosen.size(0);
  p.num_cols = rejected.size(0);
  p.chosen = scores_in_accumulate_type ? chosen.to(acc).contiguous() : chosen.contiguous();
  p.rejected = scores_in_accumulate_type ? rejected.to(acc).contiguous() : rejected.contiguous();
  if (options.weighting == kEmbedding) {
    // Embeddings are cast to the accumulate type (no copy when they already have it). Cosines are formed as
    // (e_i . f_j) * inv_norm_i * inv_norm_j inside the blocks, so no normalised copy is made.
    p.chosen_emb = chosen_emb->to(acc).contiguous();
    p.rejected_emb = rejected_emb->to(acc).contiguous();
    p.chosen_inv_norm = at::linalg_vector_norm(p.chosen_emb, 2, {1}).clamp_min_(1e-8).reciprocal_();
    p.rejected_inv_norm = at::linalg_vector_norm(p.rejected_emb, 2, {1}).clamp_min_(1e-8).reciprocal_();
  }
  return p;
}

int64_t rows_per_block(int64_t num_rows, int64_t num_cols, int64_t budget_elements) {
  const int64_t rows = budget_elements / std::max<int64_t>(num_cols, 1);
  return std::max<int64_t>(1, std::min<int64_t>(rows, num_rows));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> assemble_outputs(const at::Tensor& loss_sum, const at::Tensor& row_sums,
                                                                 const at::Tensor& col_sums,
                                                                 at::ScalarType score_type,
                                                                 const ContrastOptions& options) {
  auto loss = (loss_sum * options.loss_scale).to(score_type);
  if (!options.compute_grad) {
    auto empty = at::empty({0}, row_sums.options().dtype(score_type));
    return {loss, empty, empty.clone()};
  }
  const double grad_scale = options.loss_scale * options.beta;
  auto grad_chosen = (row_sums * grad_scale).to(score_type);
  auto grad_rejected = (col_sums * (-grad_scale)).to(score_type);
  return {loss, grad_chosen, grad_rejected};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_outputs(const at::Tensor& chosen, const at::Tensor& rejected,
                                                              const ContrastOptions& options) {
  auto loss = at::zeros({}, chosen.options());
  if (!options.compute_grad) {
    return {loss, at::empty({0}, chosen.options()), at::empty({0}, chosen.options())};
  }
  return {loss, at::zeros_like(chosen, at::MemoryFormat::Contiguous),
          at::zeros_like(rejected, at::MemoryFormat::Contiguous)};
}

}  // namespace ops
}  // namespace rpo

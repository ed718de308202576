// Device-independent entry of rpo::contrast_loss_and_grads (see contrast_loss.h).
#include "contrast_loss.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <cmath>
#include <string>

namespace rpo {
namespace ops {

using kernels::kDiagonal;
using kernels::kEmbedding;

namespace {

constexpr const char* kOp = "rpo::contrast_loss_and_grads";

kernels::Weighting parse_weighting(c10::string_view name) {
  if (name == "embedding") return kernels::kEmbedding;
  if (name == "uniform") return kernels::kUniform;
  if (name == "diagonal") return kernels::kDiagonal;
  if (name == "none") return kernels::kNone;
  TORCH_CHECK(false, kOp, ": weighting must be 'embedding', 'uniform', 'diagonal' or 'none', got '",
              std::string(name), "'");
}

kernels::Normalization parse_normalization(c10::string_view name) {
  if (name == "row") return kernels::kRowNormalization;
  if (name == "mean") return kernels::kMeanNormalization;
  TORCH_CHECK(false, kOp, ": weight_normalization must be 'row' or 'mean', got '", std::string(name), "'");
}

// TORCH_CHECKs of the op (the Python wrapper raises friendlier errors first, naming the Python arguments).
void check_args(const at::Tensor& chosen, const at::Tensor& rejected, const std::optional<at::Tensor>& chosen_emb,
                const std::optional<at::Tensor>& rejected_emb, const ContrastOptions& options) {
  TORCH_CHECK(chosen.dim() == 1, kOp, ": chosen must be 1-D, got shape ", chosen.sizes());
  TORCH_CHECK(rejected.dim() == 1, kOp, ": rejected must be 1-D, got shape ", rejected.sizes());
  TORCH_CHECK(chosen.scalar_type() == rejected.scalar_type(), kOp, ": chosen and rejected must have the same dtype, got ",
              chosen.scalar_type(), " and ", rejected.scalar_type());
  const auto dtype = chosen.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16, kOp,
              ": scores must be float32, bfloat16 or float64, got ", dtype);
  TORCH_CHECK(chosen.device() == rejected.device(), kOp, ": chosen is on ", chosen.device(), " but rejected is on ",
              rejected.device());
  TORCH_CHECK(std::isfinite(options.beta), kOp, ": beta must be finite, got ", options.beta);
  TORCH_CHECK(std::isfinite(options.margin), kOp, ": margin must be finite, got ", options.margin);
  TORCH_CHECK(std::isfinite(options.loss_scale), kOp, ": loss_scale must be finite, got ", options.loss_scale);
  const int64_t num_rows = chosen.size(0);
  const int64_t num_cols = rejected.size(0);
  if (options.weighting == kEmbedding) {
    TORCH_CHECK(std::isfinite(options.tau) && options.tau > 0, kOp, ": tau must be finite and > 0, got ", options.tau);
    TORCH_CHECK(chosen_emb.has_value() && rejected_emb.has_value(), kOp,
                ": the embedding weighting needs chosen_emb and rejected_emb");
    const auto& e = *chosen_emb;
    const auto& f = *rejected_emb;
    TORCH_CHECK(e.dim() == 2 && f.dim() == 2, kOp, ": embeddings must be 2-D, got shapes ", e.sizes(), " and ",
                f.sizes());
    TORCH_CHECK(e.size(0) == num_rows, kOp, ": chosen_emb has ", e.size(0), " rows but chosen has ", num_rows,
                " scores");
    TORCH_CHECK(f.size(0) == num_cols, kOp, ": rejected_emb has ", f.size(0), " rows but rejected has ", num_cols,
                " scores");
    TORCH_CHECK(e.size(1) == f.size(1), kOp, ": embedding dims differ: ", e.size(1), " vs ", f.size(1));
    TORCH_CHECK(at::isFloatingType(e.scalar_type()) && at::isFloatingType(f.scalar_type()), kOp,
                ": embeddings must be floating point, got ", e.scalar_type(), " and ", f.scalar_type());
    TORCH_CHECK(e.device() == chosen.device() && f.device() == chosen.device(), kOp,
                ": embeddings must be on the scores' device ", chosen.device());
  }
  if (options.weighting == kDiagonal && num_rows > 0) {
    TORCH_CHECK(options.alpha >= 0 && options.alpha <= 1, kOp, ": alpha must be in [0, 1], got ", options.alpha);
    TORCH_CHECK(num_cols >= 2, kOp, ": the diagonal weighting needs at least 2 columns, got ", num_cols);
    TORCH_CHECK(options.diag_offset >= 0 && options.diag_offset + num_rows <= num_cols, kOp,
                ": diagonal columns diag_offset + i must lie in [0, ", num_cols, ") for all ", num_rows,
                " rows, got diag_offset ", options.diag_offset);
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
  }
  return p;
}

// The cosine GEMMs run in full float32 whatever the process-wide setting (issue 14: TF32 would move the weights
// by ~1e-3). cuBLAS: at::NoTF32Guard, thread-local. oneDNN (CPU; bfloat16 or TF32 under
// torch.set_float32_matmul_precision("medium"/"high") on CPUs with AMX) has no thread-local switch, so its
// float32 matmul precision is set to IEEE for the call and restored after: process-wide, so a float32 matmul
// that another thread runs during the call is in full precision too.
class FullFloat32Matmul {
 public:
  FullFloat32Matmul() {
    auto& context = at::globalContext();
    saved_ = context.float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL);
    changed_ = saved_ == at::Float32Precision::BF16 || saved_ == at::Float32Precision::TF32;
    if (changed_) {
      // The getter resolves inheritance (matmul <- all ops of the backend <- generic): a value equal to the
      // parent's was most likely inherited, so it is restored as "inherit" rather than pinned.
      inherited_ = saved_ == context.float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::ALL);
      context.setFloat32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL, at::Float32Precision::IEEE);
    }
  }
  ~FullFloat32Matmul() {
    if (changed_) {
      at::globalContext().setFloat32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL,
                                              inherited_ ? at::Float32Precision::NONE : saved_);
    }
  }
  FullFloat32Matmul(const FullFloat32Matmul&) = delete;
  FullFloat32Matmul& operator=(const FullFloat32Matmul&) = delete;

 private:
  at::NoTF32Guard no_tf32_;
  at::Float32Precision saved_;
  bool changed_ = false;
  bool inherited_ = false;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> assemble_outputs(const ContrastSums& sums, at::ScalarType score_type,
                                                                 const ContrastOptions& options) {
  auto loss = (sums.loss_sum * options.loss_scale).to(score_type);
  if (!options.compute_grad) {
    auto empty = at::empty({0}, sums.row_sums.options().dtype(score_type));
    return {loss, empty, empty.clone()};
  }
  const double grad_scale = options.loss_scale * options.beta;
  auto grad_chosen = (sums.row_sums * grad_scale).to(score_type);
  auto grad_rejected = (sums.col_sums * (-grad_scale)).to(score_type);
  return {loss, grad_chosen, grad_rejected};
}

// Output for M = 0 or N = 0: loss 0 and zero gradients.
std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_outputs(const at::Tensor& chosen, const at::Tensor& rejected,
                                                              const ContrastOptions& options) {
  auto loss = at::zeros({}, chosen.options());
  if (!options.compute_grad) {
    return {loss, at::empty({0}, chosen.options()), at::empty({0}, chosen.options())};
  }
  return {loss, at::zeros_like(chosen, at::MemoryFormat::Contiguous),
          at::zeros_like(rejected, at::MemoryFormat::Contiguous)};
}

}  // namespace

at::ScalarType accumulate_type(at::ScalarType score_type) {
  return score_type == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor inverse_row_norms(const at::Tensor& embeddings) {
  return at::linalg_vector_norm(embeddings, 2, {1}).clamp_min_(1e-8).reciprocal_();
}

int64_t rows_per_block(int64_t num_rows, int64_t num_cols, int64_t budget_elements) {
  const int64_t rows = budget_elements / std::max<int64_t>(num_cols, 1);
  return std::max<int64_t>(1, std::min<int64_t>(rows, num_rows));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrast_loss_and_grads(
    ContrastSumsKernel kernel, bool scores_in_accumulate_type, const at::Tensor& chosen, const at::Tensor& rejected,
    const std::optional<at::Tensor>& chosen_emb, const std::optional<at::Tensor>& rejected_emb, double beta,
    double margin, double tau, double alpha, c10::string_view weighting, c10::string_view weight_normalization,
    int64_t diag_offset, double loss_scale, bool compute_grad) {
  const ContrastOptions options{beta,          margin,     tau,          alpha, parse_weighting(weighting),
                                parse_normalization(weight_normalization), diag_offset, loss_scale, compute_grad};
  check_args(chosen, rejected, chosen_emb, rejected_emb, options);
  if (chosen.numel() == 0 || rejected.numel() == 0) {
    return empty_outputs(chosen, rejected, options);
  }
  const c10::DeviceGuard device_guard(chosen.device());
  const auto inputs =
      prepare_inputs(chosen, rejected, chosen_emb, rejected_emb, options, scores_in_accumulate_type);
  const auto acc_options = chosen.options().dtype(accumulate_type(chosen.scalar_type()));
  ContrastSums sums{at::zeros({}, chosen.options().dtype(at::kDouble)), at::zeros({inputs.num_rows}, acc_options),
                    at::zeros({inputs.num_cols}, acc_options)};
  {
    const FullFloat32Matmul full_float32_matmul;
    kernel(inputs, options, sums);
  }
  return assemble_outputs(sums, chosen.scalar_type(), options);
}

}  // namespace ops
}  // namespace rpo

// Shared (device-independent) part of rpo::contrast_loss_terms: argument checks, input preparation, row
// blocking and output assembly. The per-device kernels live in cpu/ and cuda/; the element math in kernels/.
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>

#include <cstdint>
#include <tuple>

namespace rpo {
namespace ops {

// The scalar arguments of the op, after the checks.
struct ContrastOptions {
  double beta;
  double margin;
  double tau;
  double alpha;
  int64_t weighting;
  int64_t normalization;
  int64_t diag_offset;
  double loss_scale;
  bool compute_grad;
};

// Contiguous inputs; embeddings and norms in the accumulate dtype (float32 for float32/bfloat16 scores, float64
// for float64), scores too unless the kernel loads them in their own dtype.
struct PreparedInputs {
  at::Tensor chosen;             // [M]
  at::Tensor rejected;           // [N]
  at::Tensor chosen_emb;         // [M, D], defined only for the "embedding" weighting
  at::Tensor rejected_emb;       // [N, D]
  at::Tensor chosen_inv_norm;    // [M], 1 / max(|e_i|, 1e-8)
  at::Tensor rejected_inv_norm;  // [N]
  int64_t num_rows;
  int64_t num_cols;
};

// TORCH_CHECKs shared by every backend (the Python wrapper raises friendlier errors first).
void check_contrast_args(const at::Tensor& chosen, const at::Tensor& rejected,
                         const std::optional<at::Tensor>& chosen_emb, const std::optional<at::Tensor>& rejected_emb,
                         const ContrastOptions& options);

at::ScalarType accumulate_type(at::ScalarType score_type);

PreparedInputs prepare_inputs(const at::Tensor& chosen, const at::Tensor& rejected,
                              const std::optional<at::Tensor>& chosen_emb,
                              const std::optional<at::Tensor>& rejected_emb, const ContrastOptions& options,
                              bool scores_in_accumulate_type);

// Rows per similarity block so that one block buffer holds about `budget_elements` values (at least one row).
int64_t rows_per_block(int64_t num_rows, int64_t num_cols, int64_t budget_elements);

// loss = loss_scale * loss_sum; grad_chosen = loss_scale * beta * row_sums; grad_rejected = -loss_scale * beta *
// col_sums (sums of w_ij * dloss_ij/ds_ij), all cast to the score dtype. Empty grads when !compute_grad.
std::tuple<at::Tensor, at::Tensor, at::Tensor> assemble_outputs(const at::Tensor& loss_sum, const at::Tensor& row_sums,
                                                                 const at::Tensor& col_sums,
                                                                 at::ScalarType score_type,
                                                                 const ContrastOptions& options);

// Output for M = 0 or N = 0: loss 0 and zero gradients.
std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_outputs(const at::Tensor& chosen, const at::Tensor& rejected,
                                                              const ContrastOptions& options);

ContrastOptions make_options(double beta, double margin, double tau, double alpha, int64_t weighting,
                             int64_t normalization, int64_t diag_offset, double loss_scale, bool compute_grad);

// Backend kernels (registered in cpu/ and cuda/).
std::tuple<at::Tensor, at::Tensor, at::Tensor> contrast_loss_terms_cpu(
    const at::Tensor& chosen, const at::Tensor& rejected, const std::optional<at::Tensor>& chosen_emb,
    const std::optional<at::Tensor>& rejected_emb, double beta, double margin, double tau, double alpha,
    int64_t weighting, int64_t normalization, int64_t diag_offset, double loss_scale, bool compute_grad);

#ifdef RPO_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> contrast_loss_terms_cuda(
    const at::Tensor& chosen, const at::Tensor& rejected, const std::optional<at::Tensor>& chosen_emb,
    const std::optional<at::Tensor>& rejected_emb, double beta, double margin, double tau, double alpha,
    int64_t weighting, int64_t normalization, int64_t diag_offset, double loss_scale, bool compute_grad);
#endif

// Number of distinct OS threads that ran row chunks in the last CPU call (evidence for the threading test).
int64_t cpu_threads_used_last_call();

}  // namespace ops
}  // namespace rpo

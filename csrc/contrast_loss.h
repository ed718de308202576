// Device-independent entry of rpo::contrast_loss_and_grads (torch.ops.rpo.contrast_loss_and_grads).
//
// `contrast_loss_and_grads` does every step the backends share: parsing the string arguments, the checks,
// input preparation (contiguous inputs, inverse embedding norms), the full-float32 matmul policy, allocation of
// the sums and assembly of the outputs. A backend supplies only a `ContrastSumsKernel` (its compute) and
// registers `contrast_loss_and_grads_kernel<its kernel, ...>` for its dispatch key (cpu/, cuda/). The element
// math shared by the kernels is in kernels/contrast_math.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "kernels/contrast_math.h"

namespace rpo {
namespace ops {

// The scalar arguments of the op, after parsing and checks.
struct ContrastOptions {
  double beta;
  double margin;
  double tau;
  double alpha;
  kernels::Weighting weighting;
  kernels::Normalization normalization;
  int64_t diag_offset;
  double loss_scale;
  bool compute_grad;
};

// Contiguous inputs; embeddings in the accumulate dtype (float32 for float32/bfloat16 scores, float64 for
// float64), scores too when the backend asks for it (else in their own dtype). The inverse embedding norms are
// the backend's: the CPU kernel computes them inside its one parallel region (`inverse_row_norms` would add
// two more regions per call, each a wait for descheduled threads on a loaded machine).
struct PreparedInputs {
  at::Tensor chosen;        // [M]
  at::Tensor rejected;      // [N]
  at::Tensor chosen_emb;    // [M, D], defined only for the "embedding" weighting
  at::Tensor rejected_emb;  // [N, D]
  int64_t num_rows;
  int64_t num_cols;
};

// What a backend computes, in the accumulate dtype (zero-initialised by the entry; M, N >= 1):
// loss_sum (float64 scalar) = sum_ij loss_ij; row_sums [M] = sum_j w_ij dloss_ij/ds_ij; col_sums [N] = sum_i of
// the same (row/col sums only needed when options.compute_grad). The CPU kernel sets loss_sum to NaN when an
// embedding has a non-finite value (found while computing the norms), so that its callers can leave the value
// check of the embeddings to the rare non-finite loss (rpo/ops/functions.py).
struct ContrastSums {
  at::Tensor loss_sum;
  at::Tensor row_sums;
  at::Tensor col_sums;
};

using ContrastSumsKernel = void (*)(const PreparedInputs& inputs, const ContrastOptions& options,
                                    ContrastSums& sums);

at::ScalarType accumulate_type(at::ScalarType score_type);

// 1 / max(|e_i|, 1e-8) for each row of `embeddings` [rows, D], with ATen ops (used by the CUDA kernel).
at::Tensor inverse_row_norms(const at::Tensor& embeddings);

// Rows per similarity block so that one block buffer holds about `budget_elements` values (at least one row).
int64_t rows_per_block(int64_t num_rows, int64_t num_cols, int64_t budget_elements);

// The op, given a backend's kernel. scores_in_accumulate_type: convert the scores before the kernel (CPU) or
// pass them in their own dtype (CUDA widens bfloat16 in registers).
std::tuple<at::Tensor, at::Tensor, at::Tensor> contrast_loss_and_grads(
    ContrastSumsKernel kernel, bool scores_in_accumulate_type, const at::Tensor& chosen, const at::Tensor& rejected,
    const std::optional<at::Tensor>& chosen_emb, const std::optional<at::Tensor>& rejected_emb, double beta,
    double margin, double tau, double alpha, c10::string_view weighting, c10::string_view weight_normalization,
    int64_t diag_offset, double loss_scale, bool compute_grad);

// The function a backend registers for its dispatch key (the op's schema, with the kernel bound).
template <ContrastSumsKernel kernel, bool scores_in_accumulate_type>
std::tuple<at::Tensor, at::Tensor, at::Tensor> contrast_loss_and_grads_kernel(
    const at::Tensor& chosen, const at::Tensor& rejected, const std::optional<at::Tensor>& chosen_emb,
    const std::optional<at::Tensor>& rejected_emb, double beta, double margin, double tau, double alpha,
    c10::string_view weighting, c10::string_view weight_normalization, int64_t diag_offset, double loss_scale,
    bool compute_grad) {
  return contrast_loss_and_grads(kernel, scores_in_accumulate_type, chosen, rejected, chosen_emb, rejected_emb,
                                 beta, margin, tau, alpha, weighting, weight_normalization, diag_offset, loss_scale,
                                 compute_grad);
}

// Number of distinct OS threads that ran row chunks in the last CPU call (evidence for the threading test).
int64_t cpu_threads_used_last_call();

}  // namespace ops
}  // namespace rpo

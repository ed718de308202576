// CUDA compute of rpo::contrast_loss_and_grads (the shared steps are in contrast_loss.cpp): row-block cosines
// via at::mm on the CUDA tensors (cuBLAS, full float32: the entry holds at::NoTF32Guard), then the torch-free
// kernels of kernels/contrast_cuda_kernels.cuh on the current stream. Scores are loaded in their own
// dtype (bfloat16 widened in registers); everything is accumulated in float32 (float64 for float64 scores).
// Uses c10/cuda stream and guard headers only (ATen/cuda/CUDAContext.h needs cuBLAS/cuSPARSE headers).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "contrast_loss.h"
#include "kernels/contrast_cuda_kernels.cuh"

namespace rpo {
namespace ops {
namespace {

namespace kc = kernels::cuda;

// 128 MiB of float32 cosines per row block (2048 rows at N = 16384).
constexpr int64_t kCudaBlockElements = int64_t(1) << 25;

// c10::BFloat16 is layout-compatible with __nv_bfloat16; the kernels take the CUDA type.
template <typename scalar_t>
struct DeviceScalar {
  using type = scalar_t;
};
template <>
struct DeviceScalar<c10::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename scalar_t>
void contrast_sums_cuda_typed(const PreparedInputs& in, const ContrastOptions& options, ContrastSums& sums) {
  using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
  using device_t = typename DeviceScalar<scalar_t>::type;
  const int64_t num_rows = in.num_rows;
  const int64_t num_cols = in.num_cols;
  const bool embedding = options.weighting == kernels::kEmbedding;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  kc::PairPassParams<device_t, acc_t> params{};
  params.rejected = reinterpret_cast<const device_t*>(in.rejected.data_ptr<scalar_t>());
  params.constant =
      kernels::make_weight_params<acc_t>(options.weighting, options.normalization, num_cols, options.alpha);
  params.has_diagonal = options.weighting == kernels::kDiagonal;
  params.beta = static_cast<acc_t>(options.beta);
  params.margin = static_cast<acc_t>(options.margin);
  params.num_cols = num_cols;
  params.col_sums = sums.col_sums.data_ptr<acc_t>();
  params.loss_sum = sums.loss_sum.data_ptr<double>();
  const device_t* chosen = reinterpret_cast<const device_t*>(in.chosen.data_ptr<scalar_t>());
  acc_t* row_sums_ptr = sums.row_sums.data_ptr<acc_t>();

  if (!embedding) {
    params.chosen = chosen;
    params.row_sums = row_sums_ptr;
    params.first_diag_col = options.diag_offset;
    params.num_rows = num_rows;
    C10_CUDA_CHECK(kc::launch_pair_pass(params, /*embedding=*/false, stream));
    return;
  }

  const int64_t block_rows = rows_per_block(num_rows, num_cols, kCudaBlockElements);
  auto acc_options = in.chosen_emb.options();
  auto block = at::empty({block_rows, num_cols}, acc_options);
  auto row_weight_scale = at::empty({block_rows}, acc_options);
  auto rejected_emb_t = in.rejected_emb.t();
  const auto chosen_inv_norm_t = inverse_row_norms(in.chosen_emb);
  const auto rejected_inv_norm_t = inverse_row_norms(in.rejected_emb);
  const acc_t* chosen_inv_norm = chosen_inv_norm_t.data_ptr<acc_t>();
  const acc_t* rejected_inv_norm = rejected_inv_norm_t.data_ptr<acc_t>();
  const acc_t inv_tau = static_cast<acc_t>(1.0 / options.tau);
  for (int64_t begin = 0; begin < num_rows; begin += block_rows) {
    const int64_t rows = std::min(block_rows, num_rows - begin);
    auto dots = block.narrow(0, 0, rows);
    at::mm_out(dots, in.chosen_emb.narrow(0, begin, rows), rejected_emb_t);  // same stream: ordered
    C10_CUDA_CHECK(kc::launch_softmax_rows<acc_t>(dots.data_ptr<acc_t>(), rows, num_cols, chosen_inv_norm + begin,
                                                  rejected_inv_norm, inv_tau, params.constant.scale,
                                                  row_weight_scale.data_ptr<acc_t>(), stream));
    params.chosen = chosen + begin;
    params.row_sums = row_sums_ptr + begin;
    params.first_diag_col = 0;
    params.num_rows = rows;
    params.weights = dots.data_ptr<acc_t>();
    params.row_weight_scale = row_weight_scale.data_ptr<acc_t>();
    C10_CUDA_CHECK(kc::launch_pair_pass(params, /*embedding=*/true, stream));
  }
}

void contrast_sums_cuda(const PreparedInputs& inputs, const ContrastOptions& options, ContrastSums& sums) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, inputs.chosen.scalar_type(), "rpo_contrast_loss_and_grads_cuda",
                                 [&] { contrast_sums_cuda_typed<scalar_t>(inputs, options, sums); });
}

}  // namespace

// Scores stay in their own dtype: the kernels widen bfloat16 in registers.
TORCH_LIBRARY_IMPL(rpo, CUDA, m) {
  m.impl("contrast_loss_and_grads",
         &contrast_loss_and_grads_kernel<contrast_sums_cuda, /*scores_in_accumulate_type=*/false>);
}

}  // namespace ops
}  // namespace rpo

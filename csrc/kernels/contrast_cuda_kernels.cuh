// Torch-free CUDA kernels of rpo::contrast_loss_and_grads, with host launchers taking raw pointers and a stream.
// Included by the torch binding (cuda/contrast_loss_cuda.cu) and by the nvcc-only compile check
// (kernel_check/contrast_kernels_check.cu), so only the CUDA runtime and contrast_math.h may be used here.
//
// Per row block (rows x N): for the "embedding" weighting the binding fills `dots` with e_i . f_j (one GEMM),
// softmax_rows_kernel turns each row into softmax numerators in place and writes scale / row sum, then
// pair_pass_kernel visits every pair once, producing the loss and both gradient sums. Each CTA covers
// kRowsPerCta rows x kThreads columns: a thread keeps its column's gradient sum in a register across those
// rows, row sums are reduced in the CTA, and the partial sums are added to global memory with atomics
// (one per column and per row per CTA; float atomics make the last bits order-dependent).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/contrast_math.h"

namespace rpo {
namespace kernels {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerCta = 16;
// gridDim.y limit (65535) times kRowsPerCta: the launchers split larger row counts.
constexpr int64_t kMaxRowsPerLaunch = int64_t(65535) * kRowsPerCta;

// Loads a score in the accumulate type (bfloat16 is widened to float).
template <typename acc_t, typename scalar_t>
struct Load {
  static __device__ __forceinline__ acc_t from(scalar_t v) { return static_cast<acc_t>(v); }
};
template <typename acc_t>
struct Load<acc_t, __nv_bfloat16> {
  static __device__ __forceinline__ acc_t from(__nv_bfloat16 v) { return static_cast<acc_t>(__bfloat162float(v)); }
};

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const T other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

// Sum (kMax = false) or max (kMax = true) over the CTA; every thread gets the result.
template <bool kMax, typename T>
__device__ __forceinline__ T block_reduce(T v, T* scratch /* kWarps */) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  __syncthreads();  // scratch may still be read from a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T out = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) out = kMax ? (scratch[w] > out ? scratch[w] : out) : out + scratch[w];
  return out;
}

// One CTA per row: dots[r, j] (= e_r . f_j) -> cos -> exp((cos - row max) / tau) in place; writes
// row_weight_scale[r] = scale / sum_j numerator (scale: 1 for "row", N for "mean").
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    softmax_rows_kernel(acc_t* __restrict__ dots, int64_t num_cols, const acc_t* __restrict__ row_inv_norm,
                        const acc_t* __restrict__ col_inv_norm, acc_t inv_tau, acc_t scale,
                        acc_t* __restrict__ row_weight_scale) {
  __shared__ acc_t scratch[kWarps];
  const int64_t r = blockIdx.x;
  acc_t* row = dots + r * num_cols;
  const acc_t ri = row_inv_norm[r];
  acc_t row_max = -acc_t(1e30);
  for (int64_t j = threadIdx.x; j < num_cols; j += kThreads) {
    const acc_t cos = row[j] * ri * col_inv_norm[j];
    row[j] = cos;
    row_max = cos > row_max ? cos : row_max;
  }
  row_max = block_reduce<true>(row_max, scratch);
  acc_t sum = 0;
  for (int64_t j = threadIdx.x; j < num_cols; j += kThreads) {
    const acc_t numerator = softmax_numerator(row[j], row_max, inv_tau);
    row[j] = numerator;
    sum += numerator;
  }
  sum = block_reduce<false>(sum, scratch);
  if (threadIdx.x == 0) row_weight_scale[r] = scale / sum;
}

template <typename scalar_t, typename acc_t>
struct PairPassParams {
  const scalar_t* chosen;          // scores of this launch's rows, [rows]
  const scalar_t* rejected;        // [N]
  const acc_t* weights;            // "embedding": softmax numerators [rows, N]; else nullptr
  const acc_t* row_weight_scale;   // "embedding": [rows]
  WeightParams<acc_t> constant;    // the other weightings
  bool has_diagonal;               // "diagonal": row r's diagonal is column first_diag_col + r
  int64_t first_diag_col;
  acc_t beta;
  acc_t margin;
  int64_t num_rows;                // rows of this launch (<= kMaxRowsPerLaunch)
  int64_t num_cols;
  acc_t* row_sums;                 // [rows] += sum_j w_ij dloss_ij/ds_ij (zero-initialised by the caller)
  acc_t* col_sums;                 // [N]    += sum_i w_ij dloss_ij/ds_ij
  double* loss_sum;                // scalar += sum_ij loss_ij
};

template <typename scalar_t, typename acc_t, bool kEmbedding>
__global__ void __launch_bounds__(kThreads) pair_pass_kernel(PairPassParams<scalar_t, acc_t> p) {
  __shared__ acc_t row_scratch[kRowsPerCta][kWarps];
  __shared__ acc_t loss_scratch[kWarps];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * kRowsPerCta;
  const bool valid_col = col < p.num_cols;
  const acc_t b = valid_col ? Load<acc_t, scalar_t>::from(p.rejected[col]) : acc_t(0);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;

  acc_t col_acc = 0;
  acc_t loss_acc = 0;
#pragma unroll
  for (int r = 0; r < kRowsPerCta; ++r) {
    const int64_t row = row_begin + r;
    acc_t wg = 0;
    if (valid_col && row < p.num_rows) {
      const acc_t a = Load<acc_t, scalar_t>::from(p.chosen[row]);
      acc_t w;
      if (kEmbedding) {
        w = p.weights[row * p.num_cols + col] * p.row_weight_scale[row];
      } else {
        w = (p.has_diagonal && col == p.first_diag_col + row) ? p.constant.diagonal : p.constant.off_diagonal;
      }
      const PairTerm<acc_t> term = softplus_neg_and_grad(w * (p.beta * (a - b) - p.margin));
      wg = w * term.dloss_ds;
      loss_acc += term.loss;
      col_acc += wg;
    }
    wg = warp_sum(wg);
    if (lane == 0) row_scratch[r][warp] = wg;
  }
  loss_acc = warp_sum(loss_acc);
  if (lane == 0) loss_scratch[warp] = loss_acc;
  __syncthreads();
  if (threadIdx.x < kRowsPerCta) {
    const int64_t row = row_begin + threadIdx.x;
    if (row < p.num_rows) {
      acc_t sum = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += row_scratch[threadIdx.x][w];
      atomicAdd(p.row_sums + row, sum);
    }
  }
  if (threadIdx.x == 0) {
    acc_t sum = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += loss_scratch[w];
    atomicAdd(p.loss_sum, static_cast<double>(sum));
  }
  if (valid_col) atomicAdd(p.col_sums + col, col_acc);
}

// ---- host launchers --------------------------------------------------------------------------------------------

template <typename acc_t>
cudaError_t launch_softmax_rows(acc_t* dots, int64_t num_rows, int64_t num_cols, const acc_t* row_inv_norm,
                                const acc_t* col_inv_norm, acc_t inv_tau, acc_t scale, acc_t* row_weight_scale,
                                cudaStream_t stream) {
  if (num_rows == 0) return cudaSuccess;
  softmax_rows_kernel<acc_t><<<static_cast<unsigned int>(num_rows), kThreads, 0, stream>>>(
      dots, num_cols, row_inv_norm, col_inv_norm, inv_tau, scale, row_weight_scale);
  return cudaGetLastError();
}

// Visits rows [0, p.num_rows) x all columns, splitting rows over several launches past the grid limit.
template <typename scalar_t, typename acc_t>
cudaError_t launch_pair_pass(PairPassParams<scalar_t, acc_t> p, bool embedding, cudaStream_t stream) {
  const int64_t total_rows = p.num_rows;
  const unsigned int col_tiles = static_cast<unsigned int>((p.num_cols + kThreads - 1) / kThreads);
  for (int64_t begin = 0; begin < total_rows; begin += kMaxRowsPerLaunch) {
    PairPassParams<scalar_t, acc_t> q = p;
    q.num_rows = total_rows - begin < kMaxRowsPerLaunch ? total_rows - begin : kMaxRowsPerLaunch;
    q.chosen = p.chosen + begin;
    q.row_sums = p.row_sums + begin;
    q.first_diag_col = p.first_diag_col + begin;
    if (embedding) {
      q.weights = p.weights + begin * p.num_cols;
      q.row_weight_scale = p.row_weight_scale + begin;
    }
    const dim3 grid(col_tiles, static_cast<unsigned int>((q.num_rows + kRowsPerCta - 1) / kRowsPerCta));
    if (embedding) {
      pair_pass_kernel<scalar_t, acc_t, true><<<grid, kThreads, 0, stream>>>(q);
    } else {
      pair_pass_kernel<scalar_t, acc_t, false><<<grid, kThreads, 0, stream>>>(q);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace kernels
}  // namespace rpo

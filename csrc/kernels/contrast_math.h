// Torch-free element math of the RPO contrast loss, shared by the CPU kernel and the CUDA kernels.
//
// For chosen row i and rejected column j the pair term is
//   z_ij = beta * (a_i - b_j) - margin,   s_ij = w_ij * z_ij,   loss_ij = softplus(-s_ij) = -log sigmoid(s_ij)
// and d loss_ij / d s_ij = -sigmoid(-s_ij). The weights w do not depend on the scores, so
//   d loss / d a_i = beta * sum_j w_ij * g_ij,   d loss / d b_j = -beta * sum_i w_ij * g_ij,   g = d loss / d s.
// Everything here is plain arithmetic so the same code compiles for host (vectorised loops) and device.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define RPO_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RPO_HOST_DEVICE inline __attribute__((always_inline))
#endif

namespace rpo {
namespace kernels {

// The op's `weighting` and `weight_normalization` (strings in the schema, parsed in contrast_loss.cpp).
enum Weighting : int64_t { kEmbedding = 0, kUniform = 1, kDiagonal = 2, kNone = 3 };
enum Normalization : int64_t { kRowNormalization = 0, kMeanNormalization = 1 };

// Constant weights of the score-free weightings. For "embedding" only `scale` is used: the row softmax is
// multiplied by it (1 for "row", N for "mean").
template <typename acc_t>
struct WeightParams {
  acc_t off_diagonal;  // weight of every pair ("uniform", "none") or of the off-diagonal pairs ("diagonal")
  acc_t diagonal;      // weight of the pair (i, diag_offset + i) for "diagonal"
  acc_t scale;         // row-sum of the weights: 1 ("row") or N ("mean")
};

template <typename acc_t>
inline WeightParams<acc_t> make_weight_params(int64_t weighting, int64_t normalization, int64_t num_cols,
                                              double alpha) {
  const double scale = (normalization == kMeanNormalization) ? static_cast<double>(num_cols) : 1.0;
  WeightParams<acc_t> p{acc_t(1), acc_t(1), static_cast<acc_t>(scale)};
  if (weighting == kUniform) {
    p.off_diagonal = p.diagonal = static_cast<acc_t>(scale / static_cast<double>(num_cols));
  } else if (weighting == kDiagonal) {
    // Callers guarantee num_cols >= 2 for "diagonal".
    p.diagonal = static_cast<acc_t>(alpha * scale);
    p.off_diagonal = static_cast<acc_t>((1.0 - alpha) * scale / static_cast<double>(num_cols - 1));
  } else if (weighting == kNone) {
    p.off_diagonal = p.diagonal = acc_t(1);  // "none" is all ones whatever the normalisation
    p.scale = acc_t(1);
  }
  return p;
}

// ---- exp / log1p -------------------------------------------------------------------------------------------
// Host float: a branch-free Cody-Waite exp and an atanh-series log1p, both written so GCC vectorises the
// element loop (libm calls would keep it scalar). Max relative error ~2 ulp on the ranges used below.
// Device: the CUDA intrinsics. double: the C library (exact reference path, not performance critical).

RPO_HOST_DEVICE float bits_to_float(int32_t bits) {
  float out;
  __builtin_memcpy(&out, &bits, sizeof(out));
  return out;
}

// exp(x) for x <= 0 (all callers pass a non-positive argument). Branch-free so the host loop vectorises:
// arguments below -87 are clamped, giving exp(-87) ~ 1.6e-38 instead of a smaller number or 0; every caller
// adds or compares it with values >= 1, where the difference is far below float resolution.
RPO_HOST_DEVICE float exp_nonpositive(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f;
  const float kLn2Lo = -2.12194440e-4f;
  x = x < -87.0f ? -87.0f : x;
  const float n = __builtin_floorf(x * kLog2e + 0.5f);
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  // Cephes expf minimax polynomial on [-ln2/2, ln2/2].
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * bits_to_float((static_cast<int32_t>(n) + 127) << 23);
#endif
}

RPO_HOST_DEVICE double exp_nonpositive(double x) {
#if defined(__CUDA_ARCH__)
  return exp(x);
#else
  return std::exp(x);
#endif
}

// log1p(t) and 1 / (1 + t) for t in [0, 1], the two values the pair term needs.
template <typename acc_t>
struct Log1pAndInverse {
  acc_t log1p;    // log(1 + t)
  acc_t inverse;  // 1 / (1 + t)
};

// Host float: log1p(t) = 2 atanh(u), u = t / (2 + t) in [0, 1/3] (relative accuracy holds for tiny t, where
// log(1 + t) would round to 0), with u and 1 / (1 + t) from one division, r = 1 / ((1 + t)(2 + t)): divisions
// are the slowest vector instruction of the pair loop. Device: log1pf. double: the C library.
RPO_HOST_DEVICE Log1pAndInverse<float> log1p_and_inverse(float t) {
#if defined(__CUDA_ARCH__)
  return Log1pAndInverse<float>{log1pf(t), 1.0f / (1.0f + t)};
#else
  const float one_plus_t = 1.0f + t;
  const float two_plus_t = 2.0f + t;
  const float r = 1.0f / (one_plus_t * two_plus_t);
  const float u = t * one_plus_t * r;
  // atanh series to u^13: the first term left out, u^15 / 15, is < 2e-8 of the sum for u <= 1/3.
  const float u2 = u * u;
  float p = 1.0f / 13.0f;
  p = p * u2 + 1.0f / 11.0f;
  p = p * u2 + 1.0f / 9.0f;
  p = p * u2 + 1.0f / 7.0f;
  p = p * u2 + 1.0f / 5.0f;
  p = p * u2 + 1.0f / 3.0f;
  p = p * u2 + 1.0f;
  return Log1pAndInverse<float>{2.0f * u * p, two_plus_t * r};
#endif
}

RPO_HOST_DEVICE Log1pAndInverse<double> log1p_and_inverse(double t) {
#if defined(__CUDA_ARCH__)
  return Log1pAndInverse<double>{log1p(t), 1.0 / (1.0 + t)};
#else
  return Log1pAndInverse<double>{std::log1p(t), 1.0 / (1.0 + t)};
#endif
}

// ---- the pair term ------------------------------------------------------------------------------------------

template <typename acc_t>
struct PairTerm {
  acc_t loss;      // softplus(-s) = -log sigmoid(s)
  acc_t dloss_ds;  // -sigmoid(-s)
};

// loss = max(-s, 0) + log1p(exp(-|s|)), dloss_ds = -sigmoid(-s): one exp shared by both and no overflow for
// any finite s (scores of +-1e4 stay finite). Returned by value so the host loop vectorises.
template <typename acc_t>
RPO_HOST_DEVICE PairTerm<acc_t> softplus_neg_and_grad(acc_t s) {
  // Selects only (no guarded arithmetic), so the host loop if-converts and vectorises.
  const acc_t neg_abs_s = s < acc_t(0) ? s : -s;
  const acc_t t = exp_nonpositive(neg_abs_s);
  const acc_t neg_s_pos = s < acc_t(0) ? -s : acc_t(0);
  const Log1pAndInverse<acc_t> log_and_inv = log1p_and_inverse(t);
  // sigmoid(-s) = 1 / (1 + exp(s)): t/(1+t) for s >= 0, 1/(1+t) for s < 0.
  const acc_t sigmoid_neg_s = (s < acc_t(0) ? acc_t(1) : t) * log_and_inv.inverse;
  return PairTerm<acc_t>{neg_s_pos + log_and_inv.log1p, -sigmoid_neg_s};
}

// Weight of pair (i, j) for the score-free weightings.
template <typename acc_t>
RPO_HOST_DEVICE acc_t constant_weight(const WeightParams<acc_t>& p, int64_t col, int64_t diag_col) {
  return col == diag_col ? p.diagonal : p.off_diagonal;
}

// Unnormalised softmax term of the "embedding" weighting: exp((cos - row_max_cos) / tau). The 1 of the
// distance 1 - cos cancels in the row normalisation, and subtracting the row maximum keeps the argument <= 0.
template <typename acc_t>
RPO_HOST_DEVICE acc_t softmax_numerator(acc_t cos, acc_t row_max_cos, acc_t inv_tau) {
  return exp_nonpositive((cos - row_max_cos) * inv_tau);
}

// Inverse norm used for cosine similarity; zero rows get cosine 0 instead of NaN (torch's eps convention).
template <typename acc_t>
RPO_HOST_DEVICE acc_t inverse_norm(acc_t sum_squares) {
  const acc_t kEps = acc_t(1e-8);
#if defined(__CUDA_ARCH__)
  const acc_t norm = sqrt(sum_squares);
#else
  const acc_t norm = std::sqrt(sum_squares);
#endif
  return acc_t(1) / (norm > kEps ? norm : kEps);
}

}  // namespace kernels
}  // namespace rpo

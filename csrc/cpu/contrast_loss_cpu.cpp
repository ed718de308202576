// CPU compute of rpo::contrast_loss_and_grads (the shared steps are in contrast_loss.cpp).
//
// Rows are cut into work slots: contiguous row ranges whose number depends on M and N only. The threads of one
// at::parallel_for region pull slots from an atomic counter. A slot walks its rows in blocks: for the
// "embedding" weighting one single-threaded BLAS call gives the block's cosines (block rows x N), then each row
// gets its softmax statistics and a single vectorised pass that produces the loss and both gradient
// contributions. Each slot accumulates column gradients into its own partial row; partials are reduced in slot
// order, so results are bitwise identical for any thread count and schedule. The embeddings' inverse norms are
// computed in the same region (columns in chunks that the threads claim first; rows by the slot that uses them),
// and a non-finite norm (a NaN or infinite embedding value) makes the loss NaN: one parallel region per call.
// Extra memory: (threads * block rows + slots) * N + O(M + N) values; the M x N matrix never exists.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <thread>
#include <vector>

#include "contrast_loss.h"
#include "kernels/contrast_math.h"

namespace rpo {
namespace ops {
namespace {

using kernels::WeightParams;

// Pairs per work slot, and cosines per thread-local block: 2^22 (16 MiB of float32: 1024 rows at N = 4096). The
// cosine GEMM of a block packs all of the rejected embeddings once, so its efficiency grows with the block's
// rows (single-threaded MKL sgemm at N = 4096, D = 384, per pair: 1.15x slower at 256 rows, 1.25x at 128 than
// at 1024); blocks are still O(N) and far below one M x N matrix. RPO_CPU_BLOCK_ELEMENTS overrides the block
// size (tests use tiny blocks to exercise the block loop).
constexpr int64_t kSlotPairs = int64_t(1) << 22;
constexpr int64_t kBlockElements = int64_t(1) << 22;
// Smaller problems still get kMinSlots slots (so that several threads work) as long as each has at least
// kMinSlotPairs pairs (below that the scheduling overhead dominates).
constexpr int64_t kMinSlots = 4;
constexpr int64_t kMinSlotPairs = int64_t(1) << 16;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Fixed by M and N only, never by the thread count: the partition of the rows decides the summation order.
int64_t work_slots(int64_t num_rows, int64_t num_cols) {
  const int64_t pairs = num_rows * num_cols;
  const int64_t slots = std::max(ceil_div(pairs, kSlotPairs), std::min(kMinSlots, ceil_div(pairs, kMinSlotPairs)));
  return std::max<int64_t>(1, std::min(slots, num_rows));
}

int64_t block_elements() {
  if (const char* env = std::getenv("RPO_CPU_BLOCK_ELEMENTS")) {
    const long long value = std::atoll(env);
    TORCH_CHECK(value > 0, "RPO_CPU_BLOCK_ELEMENTS must be a positive integer, got '", env, "'");
    return value;
  }
  return kBlockElements;
}

std::atomic<int64_t> g_threads_used_last_call{0};

// GCC function multi-versioning: AVX-512 and AVX2/FMA clones of the float element passes, picked at load time
// on CPUs that have them, with a baseline x86-64 (SSE2) fallback. no-trapping-math lets GCC if-convert the selects of
// the pair term, without which the loop stays scalar (FP exceptions are never inspected). Elsewhere the plain
// function is built.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define RPO_CPU_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), optimize("no-trapping-math")))
#else
#define RPO_CPU_MULTIVERSION
#endif

template <typename acc_t>
struct RowPass {
  const acc_t* rejected;   // b_j, [N]
  const acc_t* weights;    // unnormalised weights of this row ([N], softmax numerators) or nullptr
  acc_t weight_scale;      // multiplies `weights` (scale / row sum)
  WeightParams<acc_t> constant;  // used when weights == nullptr
  int64_t diag_col;        // column with the diagonal weight, -1 for none
  acc_t chosen;            // a_i
  acc_t beta;
  acc_t margin;
  int64_t num_cols;
  acc_t* col_sums;         // += w_ij * dloss_ij/ds_ij
};

// One row of pairs: returns the loss sum and writes sum_j w_ij * dloss_ij/ds_ij to *row_sum.
template <typename acc_t, bool kEmbeddingWeights>
inline __attribute__((always_inline)) acc_t row_pass_impl(const RowPass<acc_t>& r, acc_t* row_sum) {
  acc_t loss_sum = 0;
  acc_t grad_sum = 0;
  const acc_t* __restrict__ b = r.rejected;
  const acc_t* __restrict__ weights = r.weights;
  acc_t* __restrict__ col_sums = r.col_sums;
  const acc_t a = r.chosen;
  const acc_t beta = r.beta;
  const acc_t margin = r.margin;
  const acc_t weight_scale = r.weight_scale;
  const acc_t w_off = r.constant.off_diagonal;
  const acc_t w_diag = r.constant.diagonal;
  const int64_t diag_col = r.diag_col;
  const int64_t num_cols = r.num_cols;  // a local: stores to col_sums could otherwise alias the bound
#pragma omp simd reduction(+ : loss_sum, grad_sum)
  for (int64_t j = 0; j < num_cols; ++j) {
    const acc_t w = kEmbeddingWeights ? weights[j] * weight_scale : (j == diag_col ? w_diag : w_off);
    const acc_t s = w * (beta * (a - b[j]) - margin);
    const auto term = kernels::softplus_neg_and_grad(s);
    const acc_t wg = w * term.dloss_ds;
    loss_sum += term.loss;
    grad_sum += wg;
    col_sums[j] += wg;
  }
  *row_sum = grad_sum;
  return loss_sum;
}

RPO_CPU_MULTIVERSION float row_pass_embedding(const RowPass<float>& r, float* row_sum) {
  return row_pass_impl<float, true>(r, row_sum);
}
RPO_CPU_MULTIVERSION float row_pass_constant(const RowPass<float>& r, float* row_sum) {
  return row_pass_impl<float, false>(r, row_sum);
}
double row_pass_embedding(const RowPass<double>& r, double* row_sum) {
  return row_pass_impl<double, true>(r, row_sum);
}
double row_pass_constant(const RowPass<double>& r, double* row_sum) {
  return row_pass_impl<double, false>(r, row_sum);
}

// Turns cosine dot products of one row into softmax numerators in place; returns their sum.
template <typename acc_t>
inline __attribute__((always_inline)) acc_t softmax_numerators_impl(acc_t* dots, const acc_t* col_inv_norm,
                                                                    acc_t row_inv_norm, acc_t inv_tau,
                                                                    int64_t num_cols) {
  acc_t row_max = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : row_max)
  for (int64_t j = 0; j < num_cols; ++j) {
    const acc_t cos = dots[j] * row_inv_norm * col_inv_norm[j];
    dots[j] = cos;
    row_max = cos > row_max ? cos : row_max;
  }
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < num_cols; ++j) {
    const acc_t numerator = kernels::softmax_numerator(dots[j], row_max, inv_tau);
    dots[j] = numerator;
    sum += numerator;
  }
  return sum;  // >= 1: the row maximum contributes exp(0)
}

RPO_CPU_MULTIVERSION float softmax_numerators(float* dots, const float* col_inv_norm, float row_inv_norm,
                                              float inv_tau, int64_t num_cols) {
  return softmax_numerators_impl<float>(dots, col_inv_norm, row_inv_norm, inv_tau, num_cols);
}
double softmax_numerators(double* dots, const double* col_inv_norm, double row_inv_norm, double inv_tau,
                          int64_t num_cols) {
  return softmax_numerators_impl<double>(dots, col_inv_norm, row_inv_norm, inv_tau, num_cols);
}

// 1 / max(|x|, 1e-8) of one embedding row, or NaN when the row has a non-finite value. The squares are summed in
// float64: no finite float32 row overflows, so for float32 a NaN means exactly "a value is NaN or infinite".
template <typename acc_t>
inline __attribute__((always_inline)) acc_t inverse_norm_impl(const acc_t* row, int64_t dim) {
  double sum_squares = 0;
#pragma omp simd reduction(+ : sum_squares)
  for (int64_t k = 0; k < dim; ++k) sum_squares += static_cast<double>(row[k]) * static_cast<double>(row[k]);
  const double norm = std::sqrt(sum_squares);
  if (!std::isfinite(norm)) return std::numeric_limits<acc_t>::quiet_NaN();
  return static_cast<acc_t>(1.0 / std::max(norm, 1e-8));
}

RPO_CPU_MULTIVERSION float inverse_norm(const float* row, int64_t dim) { return inverse_norm_impl(row, dim); }
double inverse_norm(const double* row, int64_t dim) { return inverse_norm_impl(row, dim); }

// Writes the inverse norms of rows [begin, end) of `embeddings` [*, dim]; returns false if one is NaN.
template <typename acc_t>
bool inverse_norms(const acc_t* embeddings, int64_t dim, int64_t begin, int64_t end, acc_t* out) {
  bool finite = true;
  for (int64_t row = begin; row < end; ++row) {
    out[row - begin] = inverse_norm(embeddings + row * dim, dim);
    finite = finite && !std::isnan(out[row - begin]);
  }
  return finite;
}

// The rejected embeddings' inverse norms, which every slot needs: cut into chunks that the threads claim from
// a counter as they enter the region, and waited for only before a thread's first softmax, after its first
// cosine GEMM (by then long done, unless the thread computing a chunk was descheduled in it).
template <typename acc_t>
class ColumnInverseNorms {
 public:
  static constexpr int64_t kChunkRows = 256;

  ColumnInverseNorms(const acc_t* embeddings, int64_t num_cols, int64_t dim)
      : embeddings_(embeddings), num_cols_(num_cols), dim_(dim), num_chunks_(ceil_div(num_cols, kChunkRows)),
        values_(num_cols) {}

  void compute_unclaimed_chunks() {
    for (int64_t chunk = next_chunk_.fetch_add(1); chunk < num_chunks_; chunk = next_chunk_.fetch_add(1)) {
      const int64_t begin = chunk * kChunkRows;
      const int64_t end = std::min(begin + kChunkRows, num_cols_);
      if (!inverse_norms(embeddings_, dim_, begin, end, values_.data() + begin)) {
        finite_.store(false, std::memory_order_relaxed);
      }
      chunks_done_.fetch_add(1, std::memory_order_release);
    }
  }

  const acc_t* wait_for_all() const {
    while (chunks_done_.load(std::memory_order_acquire) < num_chunks_) std::this_thread::yield();
    return values_.data();
  }

  bool finite() const { return finite_.load(std::memory_order_relaxed); }  // after the region

 private:
  const acc_t* embeddings_;
  int64_t num_cols_;
  int64_t dim_;
  int64_t num_chunks_;
  std::vector<acc_t> values_;
  std::atomic<int64_t> next_chunk_{0};
  std::atomic<int64_t> chunks_done_{0};
  std::atomic<bool> finite_{true};
};

template <typename acc_t>
void contrast_sums_cpu_typed(const PreparedInputs& in, const ContrastOptions& options, ContrastSums& sums) {
  const int64_t num_rows = in.num_rows;
  const int64_t num_cols = in.num_cols;
  const bool embedding = options.weighting == kernels::kEmbedding;
  const bool diagonal = options.weighting == kernels::kDiagonal;
  const auto params =
      kernels::make_weight_params<acc_t>(options.weighting, options.normalization, num_cols, options.alpha);
  // Every slot sums its own rows into its own column partial, so results are bitwise reproducible with any
  // number of threads. Threads pull slots from a shared counter, so a thread that the OS descheduled (a shared
  // machine) does fewer slots instead of holding everyone up at a barrier.
  const int64_t num_slots = work_slots(num_rows, num_cols);
  const int64_t block_rows = rows_per_block(ceil_div(num_rows, num_slots), num_cols, block_elements());

  auto acc_options = in.chosen.options();
  auto col_partials = at::zeros({num_slots, num_cols}, acc_options);
  std::vector<double> slot_loss(num_slots, 0.0);
  std::vector<size_t> slot_thread(num_slots, 0);  // which OS thread ran each slot (threading evidence)

  const acc_t* chosen = in.chosen.data_ptr<acc_t>();
  acc_t* row_sums_ptr = sums.row_sums.data_ptr<acc_t>();
  acc_t* col_partials_ptr = col_partials.data_ptr<acc_t>();
  const acc_t inv_tau = static_cast<acc_t>(1.0 / options.tau);
  const int64_t dim = embedding ? in.chosen_emb.size(1) : 0;
  const acc_t* chosen_emb = embedding ? in.chosen_emb.data_ptr<acc_t>() : nullptr;
  const at::Tensor rejected_emb_t = embedding ? in.rejected_emb.t() : at::Tensor();
  ColumnInverseNorms<acc_t> rejected_inv_norms(embedding ? in.rejected_emb.data_ptr<acc_t>() : nullptr,
                                               embedding ? num_cols : 0, dim);
  std::atomic<bool> chosen_norms_finite{true};

  RowPass<acc_t> base{};
  base.rejected = in.rejected.data_ptr<acc_t>();
  base.constant = params;
  base.diag_col = -1;
  base.beta = static_cast<acc_t>(options.beta);
  base.margin = static_cast<acc_t>(options.margin);
  base.num_cols = num_cols;

  std::atomic<int64_t> next_slot{0};
  const int64_t num_workers = std::min<int64_t>(at::get_num_threads(), num_slots);
  at::parallel_for(0, num_workers, 1, [&](int64_t worker_begin, int64_t worker_end) {
    // This thread's cosine block, reused across its slots. Inside the parallel region BLAS runs
    // single-threaded: one GEMM per thread on its own rows.
    at::Tensor block;
    std::vector<acc_t> block_inv_norms;
    const acc_t* rejected_inv_norm = nullptr;
    if (embedding) {
      block = at::empty({block_rows, num_cols}, acc_options);
      block_inv_norms.resize(block_rows);
      rejected_inv_norms.compute_unclaimed_chunks();
    }
    for (int64_t worker = worker_begin; worker < worker_end; ++worker) {
      for (int64_t slot = next_slot.fetch_add(1); slot < num_slots; slot = next_slot.fetch_add(1)) {
        slot_thread[slot] = std::hash<std::thread::id>{}(std::this_thread::get_id());
        RowPass<acc_t> pass = base;
        pass.col_sums = col_partials_ptr + slot * num_cols;
        double loss = 0.0;
        const int64_t slot_end = (slot + 1) * num_rows / num_slots;
        for (int64_t block_begin = slot * num_rows / num_slots; block_begin < slot_end; block_begin += block_rows) {
          const int64_t rows = std::min(block_rows, slot_end - block_begin);
          acc_t* dots = nullptr;
          if (embedding) {
            auto out = block.narrow(0, 0, rows);
            at::mm_out(out, in.chosen_emb.narrow(0, block_begin, rows), rejected_emb_t);
            dots = out.data_ptr<acc_t>();
            if (!inverse_norms(chosen_emb, dim, block_begin, block_begin + rows, block_inv_norms.data())) {
              chosen_norms_finite.store(false, std::memory_order_relaxed);
            }
            if (rejected_inv_norm == nullptr) rejected_inv_norm = rejected_inv_norms.wait_for_all();
          }
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t row = block_begin + r;
            pass.chosen = chosen[row];
            if (embedding) {
              acc_t* row_dots = dots + r * num_cols;
              const acc_t sum =
                  softmax_numerators(row_dots, rejected_inv_norm, block_inv_norms[r], inv_tau, num_cols);
              pass.weights = row_dots;
              pass.weight_scale = params.scale / sum;
              loss += row_pass_embedding(pass, row_sums_ptr + row);
            } else {
              pass.diag_col = diagonal ? options.diag_offset + row : -1;
              loss += row_pass_constant(pass, row_sums_ptr + row);
            }
          }
        }
        slot_loss[slot] = loss;
      }
    }
  });

  std::vector<size_t> distinct(slot_thread);
  std::sort(distinct.begin(), distinct.end());
  g_threads_used_last_call.store(std::unique(distinct.begin(), distinct.end()) - distinct.begin());

  double loss_sum = 0.0;
  for (double v : slot_loss) loss_sum += v;  // slot order: deterministic
  if (embedding && !(chosen_norms_finite.load() && rejected_inv_norms.finite())) {
    loss_sum = std::numeric_limits<double>::quiet_NaN();  // a non-finite embedding value (see ContrastSums)
  }
  // Column partials reduced over the fixed slot dimension (at::sum's order is fixed for a given shape).
  at::sum_out(sums.col_sums, col_partials, {0});
  sums.loss_sum.fill_(loss_sum);
}

void contrast_sums_cpu(const PreparedInputs& inputs, const ContrastOptions& options, ContrastSums& sums) {
  if (inputs.chosen.scalar_type() == at::kDouble) {
    contrast_sums_cpu_typed<double>(inputs, options, sums);
  } else {
    contrast_sums_cpu_typed<float>(inputs, options, sums);
  }
}

}  // namespace

int64_t cpu_threads_used_last_call() { return g_threads_used_last_call.load(); }

// The kernel reads the scores in the accumulate dtype (bfloat16 scores are converted by the entry).
TORCH_LIBRARY_IMPL(rpo, CPU, m) {
  m.impl("contrast_loss_and_grads",
         &contrast_loss_and_grads_kernel<contrast_sums_cpu, /*scores_in_accumulate_type=*/true>);
}

}  // namespace ops
}  // namespace rpo

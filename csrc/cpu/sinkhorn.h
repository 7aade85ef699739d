// Fused log-domain Sinkhorn on the CPU: forward and unrolled backward of one problem per call, on one thread
// (the binding runs the problems of a batch in parallel), with two n x m scratches per call; and the half-steps
// of SwAV's Sinkhorn-Knopp on logits. Torch-free (raw pointers), so the C++ unit tests link it without libtorch.
#pragma once

#include <cstdint>

namespace s2dc::cpu {

// One problem: cost C (n, m) row-major, log-marginals log_a (n), log_b (m) (entries may be -inf), eps > 0.
template <typename T>
struct SinkhornProblem {
  const T* cost;
  const T* log_a;
  const T* log_b;
  int64_t n;
  int64_t m;
  T eps;
};

// Alternating log-domain updates from f = g = 0, for t = 1..n_iters:
//   f_i = eps (log_a_i - LSE_j((g_j - C_ij) / eps)),  g_j = eps (log_b_j - LSE_i((f_i - C_ij) / eps)),
// stopping early (keeping the iterate t - 1) when tol > 0, t > 1 and the row-marginal error of iterate t - 1,
// sum_i |exp(f_i / eps + LSE_i) - a_i|, is below tol. Writes f (n), g (m) and the iterates
// f_hist (n_iters, n), g_hist (n_iters, m) (rows >= the returned count are left untouched);
// returns the number of completed iterations.
template <typename T>
int64_t sinkhorn_forward(const SinkhornProblem<T>& problem, int64_t n_iters, T tol, T* f, T* g, T* f_hist,
                         T* g_hist);

// Gradient of a loss L(f, g) through the n_done iterations recorded by sinkhorn_forward (reverse-mode unroll):
// from grad_f (n) and grad_g (m), writes grad_cost (n, m), grad_log_a (n) and grad_log_b (m).
template <typename T>
void sinkhorn_backward(const SinkhornProblem<T>& problem, const T* f_hist, const T* g_hist, int64_t n_done,
                       const T* grad_f, const T* grad_g, T* grad_cost, T* grad_log_a, T* grad_log_b);

// Sinkhorn-Knopp (SwAV / DINOv2) on logits L (B, K) row-major, in base-2 units: scale s = log2(e) / eps,
// x_ik = s L_ik, potentials p (B) and q (K), from p = 0; an iteration is the column half-step, then the row
// half-step:
//   q_k = -log2 K - LSE2_i(p_i + x_ik),   p_i = -log2 B - LSE2_k(q_k + x_ik)
// (LSE2 = log2 sum exp2, -inf when every term is -inf, +inf when one is +inf, never NaN); then the plan
// Q_ik = exp2(p_i + q_k + x_ik + log2 B) (rows sum to 1). Each call covers a range of columns or rows, so that
// the caller spreads the calls of a half-step over threads; exact log-sum-exps (online max shifts), one
// exponential per entry, the logits read once per call, no scratch beyond the stack.

// Columns per chunk of the column half-step (a 16-row block of a chunk, 32 KB, stays in L1 while it is summed).
template <typename T>
inline constexpr int64_t kKnoppColumnChunk = sizeof(T) == 4 ? 512 : 256;

// q_k for the columns [col_begin, col_end) from p (B), walked in chunks of kKnoppColumnChunk<T> columns.
template <typename T>
void knopp_column_update(const T* logits, int64_t B, int64_t K, T scale, const T* p, T* q, int64_t col_begin,
                         int64_t col_end);

// p_i for the rows [row_begin, row_end) from q (K), one pass over each row.
template <typename T>
void knopp_row_update(const T* logits, int64_t B, int64_t K, T scale, const T* q, T* p, int64_t row_begin,
                      int64_t row_end);

// Q_ik (B, K) row-major for the rows [row_begin, row_end) from p (B) and q (K).
template <typename T>
void knopp_plan(const T* logits, int64_t B, int64_t K, T scale, const T* p, const T* q, T* Q, int64_t row_begin,
                int64_t row_end);

}  // namespace s2dc::cpu

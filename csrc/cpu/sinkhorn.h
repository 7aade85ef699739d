// Fused log-domain Sinkhorn on the CPU: forward and unrolled backward of one problem per call, on one thread
// (the binding runs the problems of a batch in parallel), with two n x m scratches per call. Torch-free (raw
// pointers), so the C++ unit tests link it without libtorch.
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

}  // namespace s2dc::cpu

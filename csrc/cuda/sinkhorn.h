// Log-domain Sinkhorn on CUDA: host launchers (torch-free; raw device pointers and a stream).
//
// Semantics (per problem b of the batch; all potentials in cost units, eps > 0):
//   f = 0 (N), g = 0 (M)
//   for t = 1..n_iters:
//     lse_i = LSE_j((g_j - C_ij) / eps)
//     if tol > 0 and t > 1 and sum_i |exp(f_i / eps + lse_i) - exp(log_a_i)| < tol: stop (keep iteration t-1)
//     f_i = eps * (log_a_i - lse_i);  g_j = eps * (log_b_j - LSE_i((f_i - C_ij) / eps))
//     f_hist[t-1] = f;  g_hist[t-1] = g;  n_done = t
// The backward is the exact reverse-mode gradient of that loop for a loss L(f_final, g_final).
//
// Layouts (contiguous, row-major): C (B, N, M); log_a, f, grad_f, grad_log_a (B, N); log_b, g, grad_g,
// grad_log_b (B, M); f_hist (B, n_iters, N); g_hist (B, n_iters, M); n_done (B,) int64.
// All launchers are asynchronous on `stream` and return the launch error (cudaSuccess when B == 0).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace s2dc {

// Forward solve: writes f, g (final potentials), f_hist, g_hist (rows >= n_done are unspecified) and
// n_done (iterations kept, 1..n_iters). Requires n_iters >= 1. Returns cudaErrorInvalidValue on bad sizes.
template <typename T>
cudaError_t sinkhorn_forward_cuda(const T* C, const T* log_a, const T* log_b, int64_t B, int64_t N, int64_t M,
                                  T eps, int64_t n_iters, T tol, T* f, T* g, T* f_hist, T* g_hist,
                                  int64_t* n_done, cudaStream_t stream);

// Number of T elements of the workspace that sinkhorn_backward_cuda needs (B * (N + M)); it is used only
// when the adjoints of one problem do not fit in the multiprocessor's shared memory.
inline int64_t sinkhorn_backward_workspace_numel(int64_t B, int64_t N, int64_t M) { return B * (N + M); }

// Backward: given the adjoints grad_f, grad_g of the final potentials, writes grad_C (fully overwritten, no
// zero-initialisation needed), grad_log_a and grad_log_b. n_iters is the history length (f_hist.size(1));
// n_done is read on the device and clamped to [0, n_iters]. `workspace` holds
// sinkhorn_backward_workspace_numel(B, N, M) elements (its content is ignored); it may be null when
// N + M values fit in shared memory, otherwise cudaErrorInvalidValue is returned.
template <typename T>
cudaError_t sinkhorn_backward_cuda(const T* C, const T* log_a, const T* log_b, const T* f_hist, const T* g_hist,
                                   const int64_t* n_done, const T* grad_f, const T* grad_g, int64_t B, int64_t N,
                                   int64_t M, T eps, int64_t n_iters, T* grad_C, T* grad_log_a, T* grad_log_b,
                                   T* workspace, cudaStream_t stream);

}  // namespace s2dc

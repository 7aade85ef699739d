// Log-domain Sinkhorn on CUDA, small-problem design: one thread block per problem, all iterations inside
// one launch (no host synchronisation), potentials (forward) or adjoints (backward) in shared memory.
//
// C is copied into shared memory once per solve when it fits beside the vectors (N ldc + N + M values of T, plus
// the backward's column partials, within the device's opt-in limit: up to ~220 x 220 fp32 on sm_90, the S2DC
// sizes), with an odd row stride ldc = M | 1 so that a warp reading down a column (lane l on row i + l) hits 32
// distinct banks. Thread mapping (blockDim = 128..512, a multiple of 32; see block_threads), C in shared memory:
//   row pass    : warp w owns rows i = w, w + n_warps, ...; its lanes stride the columns j and the warp
//                 reduces with shuffles (max, then sum of exp(x - max): the reference's max shift).
//   column pass : the same with columns: warp w owns columns j = w, w + n_warps, ...; its lanes stride the rows.
//   backward    : warp per row for both phases; each lane keeps the column sums of its columns (j = lane + 32 c,
//                 M <= 256) in registers over the warp's rows, and the warps' partial sums are added per column
//                 after a barrier (a fixed order: deterministic, no atomics).
// Every pass is then 32-wide with O(log 32) shuffle steps per row or column: ~N / n_warps rows per warp instead
// of a thread walking all N rows of its column (latency-bound: 46 us per iteration at 48 x 145^2, H200).
// Larger problems read C from global memory on every pass (L1/L2) with the column passes a thread per column
// (coalesced rows). The math uses expf/exp (no fast-math intrinsics) and multiplies by 1 / eps instead of
// dividing by eps (within an ulp of the quotient), keeping fp32 results within the 1e-5 relative parity target
// against the PyTorch reference; the file must not be built with --use_fast_math.
//
// Shared memory: N + M values of T per block (f and g, or the adjoints F and G), then C when it fits, plus a few
// hundred bytes of static scratch. Up to 48 KiB works everywhere; above that the launchers opt in to the device's
// limit (cudaDevAttrMaxSharedMemoryPerBlockOptin: 227 KiB on sm_90, 163 KiB on sm_80, 99 KiB on sm_86/89, i.e.
// N + M up to ~58k fp32 / ~29k fp64 on an H100). Larger problems keep the same vectors in global memory
// instead (the forward in its history rows, the backward in the caller's workspace).
#include "sinkhorn.h"

#include <climits>

namespace s2dc {
namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 512;
constexpr int kMaxWarps = kMaxThreads / kWarpSize;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kLaneColumns = 8;  // columns per lane in the backward's row-owned column sums: M <= 256

// Row stride of C in shared memory: odd, so that the 32 lanes of a warp reading one column hit distinct banks.
__host__ __device__ __forceinline__ int shared_stride(int M) { return M | 1; }

extern __shared__ __align__(16) unsigned char sinkhorn_shared[];

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -static_cast<T>(INFINITY);
}

__device__ __forceinline__ float exp_t(float x) { return expf(x); }
__device__ __forceinline__ double exp_t(double x) { return exp(x); }
__device__ __forceinline__ float log_t(float x) { return logf(x); }
__device__ __forceinline__ double log_t(double x) { return log(x); }
__device__ __forceinline__ float abs_t(float x) { return fabsf(x); }
__device__ __forceinline__ double abs_t(double x) { return fabs(x); }

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const T other = __shfl_xor_sync(kFullMask, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// LSE_j((shift_j - row_j) / eps) over one row of C, by a whole warp (all lanes get the result).
// shift == nullptr means shift = 0. An all -inf row gives -inf, never NaN. Reads the row twice (max pass,
// then exp-sum pass; the second read hits L1).
template <typename T>
__device__ __forceinline__ T warp_row_lse(const T* __restrict__ row, const T* shift, int M, T inv_eps, int lane) {
  T row_max = neg_inf<T>();
  for (int j = lane; j < M; j += kWarpSize) {
    const T x = ((shift != nullptr ? shift[j] : T(0)) - row[j]) * inv_eps;
    row_max = x > row_max ? x : row_max;
  }
  row_max = warp_max(row_max);
  if (row_max == neg_inf<T>()) return row_max;  // warp-uniform: every lane holds the reduced max
  T sum = 0;
  for (int j = lane; j < M; j += kWarpSize) {
    sum += exp_t(((shift != nullptr ? shift[j] : T(0)) - row[j]) * inv_eps - row_max);
  }
  return row_max + log_t(warp_sum(sum));
}

// LSE_i((f_i - C_ij) / eps) over column j of C (row stride M), by one thread. Same max shift as above.
template <typename T>
__device__ __forceinline__ T thread_column_lse(const T* __restrict__ C, const T* f, int N, int M, int j, T inv_eps) {
  T col_max = neg_inf<T>();
  for (int i = 0; i < N; ++i) {
    const T x = (f[i] - C[static_cast<int64_t>(i) * M + j]) * inv_eps;
    col_max = x > col_max ? x : col_max;
  }
  if (col_max == neg_inf<T>()) return col_max;
  T sum = 0;
  for (int i = 0; i < N; ++i) sum += exp_t((f[i] - C[static_cast<int64_t>(i) * M + j]) * inv_eps - col_max);
  return col_max + log_t(sum);
}

// LSE_i((f_i - C_ij) / eps) over column j of C (row stride ldc), by a whole warp (all lanes get the result).
// Same max shift as the rows.
template <typename T>
__device__ __forceinline__ T warp_column_lse(const T* C, int ldc, const T* f, int N, int j, T inv_eps, int lane) {
  T col_max = neg_inf<T>();
  for (int i = lane; i < N; i += kWarpSize) {
    const T x = (f[i] - C[i * ldc + j]) * inv_eps;
    col_max = x > col_max ? x : col_max;
  }
  col_max = warp_max(col_max);
  if (col_max == neg_inf<T>()) return col_max;  // warp-uniform
  T sum = 0;
  for (int i = lane; i < N; i += kWarpSize) sum += exp_t((f[i] - C[i * ldc + j]) * inv_eps - col_max);
  return col_max + log_t(warp_sum(sum));
}

// Copies the problem's C (N x M, contiguous) into shared memory (after the N + M vector slots) with row stride
// ldc, a warp per row; returns the shared copy. Every thread reaches the barrier (callers branch on a
// block-uniform flag).
template <typename T>
__device__ __forceinline__ const T* copy_to_shared(const T* __restrict__ C, T* C_shared, int N, int M, int ldc) {
  const int lane = threadIdx.x % kWarpSize, n_warps = blockDim.x / kWarpSize;
  for (int i = threadIdx.x / kWarpSize; i < N; i += n_warps) {
    for (int j = lane; j < M; j += kWarpSize) C_shared[i * ldc + j] = C[static_cast<int64_t>(i) * M + j];
  }
  __syncthreads();
  return C_shared;
}

// Forward solve, grid = B, one problem per block.
//   f_i = eps * (log_a_i - LSE_j((g_j - C_ij) / eps))      (row pass, g of the previous iteration)
//   g_j = eps * (log_b_j - LSE_i((f_i - C_ij) / eps))      (column pass, f of this iteration)
// with the optional marginal check of iteration t-1 folded into the row pass of iteration t:
//   err = sum_i |exp(f_i / eps + lse_i) - exp(log_a_i)|, block-reduced, stop when err < tol.
// Per iteration: 2 N M exponentials, 4 reads of C (max and exp passes, rows and columns; shared memory or L1/L2 for
// small problems), N + M history writes; f and g are read from shared memory (potentials_in_shared) or from the
// history rows in global memory otherwise. The row pass writes f in place: each f_i is read (for the check)
// and rewritten by the same lane, and no other row reads it before the barrier. If the check stops the
// solve, f of iteration t-1 is still in f_hist, which is where the final outputs are copied from.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    sinkhorn_forward_kernel(const T* __restrict__ C, const T* __restrict__ log_a, const T* __restrict__ log_b,
                            int N, int M, T eps, int n_iters, T tol, bool potentials_in_shared,
                            bool cost_in_shared, T* f, T* g, T* f_hist, T* g_hist, int64_t* n_done) {
  __shared__ T warp_err[kMaxWarps];
  __shared__ int stop;
  const int64_t problem = blockIdx.x;
  const T* Cb = C + problem * N * M;
  const int ldc = cost_in_shared ? shared_stride(M) : M;
  if (cost_in_shared) Cb = copy_to_shared(Cb, reinterpret_cast<T*>(sinkhorn_shared) + N + M, N, M, ldc);
  const T inv_eps = T(1) / eps;
  const T* la = log_a + problem * N;
  const T* lb = log_b + problem * M;
  T* fh = f_hist + problem * n_iters * N;
  T* gh = g_hist + problem * n_iters * M;
  T* f_shared = reinterpret_cast<T*>(sinkhorn_shared);
  T* g_shared = f_shared + N;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int n_warps = blockDim.x / kWarpSize;

  int done = 0;
  for (int t = 1; t <= n_iters; ++t) {
    T* f_new = fh + static_cast<int64_t>(t - 1) * N;
    T* g_new = gh + static_cast<int64_t>(t - 1) * M;
    const T* g_prev = t == 1 ? nullptr : (potentials_in_shared ? g_shared : g_new - M);
    const T* f_prev = t == 1 ? nullptr : (potentials_in_shared ? f_shared : f_new - N);
    const bool check = tol > T(0) && t > 1;

    T err = 0;
    for (int i = warp; i < N; i += n_warps) {
      const T lse = warp_row_lse(Cb + static_cast<int64_t>(i) * ldc, g_prev, M, inv_eps, lane);
      if (lane == 0) {
        if (check) err += abs_t(exp_t(f_prev[i] * inv_eps + lse) - exp_t(la[i]));
        const T fi = eps * (la[i] - lse);
        f_new[i] = fi;
        if (potentials_in_shared) f_shared[i] = fi;
      }
    }
    if (check) {
      if (lane == 0) warp_err[warp] = err;
      __syncthreads();
      if (threadIdx.x == 0) {
        T total = 0;
        for (int w = 0; w < n_warps; ++w) total += warp_err[w];
        stop = total < tol;
      }
      __syncthreads();
      if (stop) break;  // block-uniform
    }
    __syncthreads();

    const T* f_cur = potentials_in_shared ? f_shared : f_new;
    if (cost_in_shared) {  // block-uniform: a warp per column
      for (int j = warp; j < M; j += n_warps) {
        const T lse = warp_column_lse(Cb, ldc, f_cur, N, j, inv_eps, lane);
        if (lane == 0) {
          const T gj = eps * (lb[j] - lse);
          g_new[j] = gj;
          g_shared[j] = gj;
        }
      }
    } else {
      for (int j = threadIdx.x; j < M; j += blockDim.x) {
        const T gj = eps * (lb[j] - thread_column_lse(Cb, f_cur, N, M, j, inv_eps));
        g_new[j] = gj;
        if (potentials_in_shared) g_shared[j] = gj;
      }
    }
    done = t;
    __syncthreads();
  }

  const T* f_last = done > 0 ? fh + static_cast<int64_t>(done - 1) * N : nullptr;
  const T* g_last = done > 0 ? gh + static_cast<int64_t>(done - 1) * M : nullptr;
  for (int i = threadIdx.x; i < N; i += blockDim.x) f[problem * N + i] = f_last != nullptr ? f_last[i] : T(0);
  for (int j = threadIdx.x; j < M; j += blockDim.x) g[problem * M + j] = g_last != nullptr ? g_last[j] : T(0);
  if (threadIdx.x == 0) n_done[problem] = done;
}

// Backward, grid = B, one problem per block. Adjoints F (of f^t) and G (of g^t) start at grad_f, grad_g;
// for t = n_done down to 1, with f^t = f_hist[t-1], g^t = g_hist[t-1], g^0 = 0:
//   Pc_ij = exp((f^t_i + g^t_j - C_ij) / eps - log_b_j)       (softmax over i of the column LSE of g^t)
//   Pr_ij = exp((f^t_i + g^{t-1}_j - C_ij) / eps - log_a_i)   (softmax over j of the row LSE of f^t)
//   phase A (warp per row):      F_i <- F_i - sum_j G_j Pc_ij;  grad_log_a_i += eps F_i
//   phase B (warp per row with C in shared memory and M <= 256, else thread per column):
//                                grad_C_ij += G_j Pc_ij + F_i Pr_ij;  grad_log_b_j += eps G_j;
//                                G_j <- -sum_i F_i Pr_ij  (adjoint of g^{t-1});
// F restarts from 0 at every t < n_done (f^{t-1} feeds only g^{t-1}).
// (dg_j/df_i = -Pc_ij, df_i/dg_j = -Pr_ij, dg_j/dC_ij = Pc_ij, df_i/dC_ij = Pr_ij.) Every grad_C element,
// grad_log_a_i and grad_log_b_j has one owning thread for the whole solve, so no atomics; G_j is summed in
// registers (per lane over a warp's rows, then over the warps in a fixed order, or by its column's thread). Terms with log_b_j = -inf (Pc) or log_a_i = -inf (Pr) are 0.
// Exponent <= 0 by construction (f, g come from these LSEs), so no overflow. Per iteration: 3 N M
// exponentials (Pc twice, Pr once), 2 reads of C, one read-modify-write of grad_C (a plain write at
// t = n_done, so no zero-initialisation), 3 history rows; F, G in shared memory (adjoints_in_shared) or in the
// workspace.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    sinkhorn_backward_kernel(const T* __restrict__ C, const T* __restrict__ log_a, const T* __restrict__ log_b,
                             const T* __restrict__ f_hist, const T* __restrict__ g_hist,
                             const int64_t* __restrict__ n_done, const T* __restrict__ grad_f,
                             const T* __restrict__ grad_g, int N, int M, T eps, int n_iters,
                             bool adjoints_in_shared, bool cost_in_shared, T* __restrict__ grad_C,
                             T* __restrict__ grad_log_a, T* __restrict__ grad_log_b, T* workspace) {
  const int64_t problem = blockIdx.x;
  const T* Cb = C + problem * N * M;
  const int ldc = cost_in_shared ? shared_stride(M) : M;
  if (cost_in_shared) Cb = copy_to_shared(Cb, reinterpret_cast<T*>(sinkhorn_shared) + N + M, N, M, ldc);
  // Row-owned phase B (see the top of the file): the warps' column partials follow C in shared memory.
  const bool row_owned = cost_in_shared && M <= kLaneColumns * kWarpSize;
  T* partials = reinterpret_cast<T*>(sinkhorn_shared) + N + M + static_cast<int64_t>(N) * ldc;
  const T inv_eps = T(1) / eps;
  const T* la = log_a + problem * N;
  const T* lb = log_b + problem * M;
  const T* fh = f_hist + problem * n_iters * N;
  const T* gh = g_hist + problem * n_iters * M;
  T* gCb = grad_C + problem * N * M;
  T* gla = grad_log_a + problem * N;
  T* glb = grad_log_b + problem * M;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int n_warps = blockDim.x / kWarpSize;

  const int64_t stored = n_done[problem];
  const int last = static_cast<int>(stored < 0 ? 0 : (stored > n_iters ? n_iters : stored));
  if (last == 0) {  // no iteration: the potentials are constants (block-uniform branch)
    for (int64_t k = threadIdx.x; k < static_cast<int64_t>(N) * M; k += blockDim.x) gCb[k] = T(0);
    for (int i = threadIdx.x; i < N; i += blockDim.x) gla[i] = T(0);
    for (int j = threadIdx.x; j < M; j += blockDim.x) glb[j] = T(0);
    return;
  }

  T* F = adjoints_in_shared ? reinterpret_cast<T*>(sinkhorn_shared) : workspace + problem * (N + M);
  T* G = F + N;
  for (int j = threadIdx.x; j < M; j += blockDim.x) G[j] = grad_g[problem * M + j];
  __syncthreads();

  for (int t = last; t >= 1; --t) {
    const bool first = t == last;
    const T* ft = fh + static_cast<int64_t>(t - 1) * N;
    const T* gt = gh + static_cast<int64_t>(t - 1) * M;
    const T* g_prev = t > 1 ? gt - M : nullptr;

    for (int i = warp; i < N; i += n_warps) {
      const T* row = Cb + static_cast<int64_t>(i) * ldc;
      const T fi = ft[i];
      T sum = 0;
      for (int j = lane; j < M; j += kWarpSize) {
        const T lbj = lb[j];
        if (lbj != neg_inf<T>()) sum += G[j] * exp_t((fi - row[j] + gt[j]) * inv_eps - lbj);
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        const T Fi = (first ? grad_f[problem * N + i] : T(0)) - sum;
        F[i] = Fi;
        gla[i] = (first ? T(0) : gla[i]) + eps * Fi;
      }
    }
    __syncthreads();

    if (row_owned) {  // block-uniform: a warp per row, column sums in registers, then across warps
      T column_sums[kLaneColumns];
#pragma unroll
      for (int c = 0; c < kLaneColumns; ++c) column_sums[c] = T(0);
      for (int i = warp; i < N; i += n_warps) {
        const T* row = Cb + static_cast<int64_t>(i) * ldc;
        T* grad_row = gCb + static_cast<int64_t>(i) * M;
        const T fi = ft[i];
        const T lai = la[i];
        const T Fi = F[i];
#pragma unroll
        for (int c = 0; c < kLaneColumns; ++c) {
          const int j = lane + c * kWarpSize;
          if (j < M) {
            const T lbj = lb[j];
            const T fi_minus_c = fi - row[j];
            const T pc = lbj != neg_inf<T>() ? exp_t((fi_minus_c + gt[j]) * inv_eps - lbj) : T(0);
            const T gpj = g_prev != nullptr ? g_prev[j] : T(0);
            const T pr = lai != neg_inf<T>() ? exp_t((fi_minus_c + gpj) * inv_eps - lai) : T(0);
            const T delta = G[j] * pc + Fi * pr;
            grad_row[j] = first ? delta : grad_row[j] + delta;
            column_sums[c] -= Fi * pr;
          }
        }
      }
#pragma unroll
      for (int c = 0; c < kLaneColumns; ++c) {
        const int j = lane + c * kWarpSize;
        if (j < M) partials[warp * M + j] = column_sums[c];
      }
      __syncthreads();  // every warp has read G
      for (int j = threadIdx.x; j < M; j += blockDim.x) {
        T G_prev = 0;
        for (int w = 0; w < n_warps; ++w) G_prev += partials[w * M + j];
        glb[j] = (first ? T(0) : glb[j]) + eps * G[j];
        G[j] = G_prev;
      }
    } else {  // a thread per column
      for (int j = threadIdx.x; j < M; j += blockDim.x) {
        const T Gj = G[j];
        const T lbj = lb[j];
        const T gtj = gt[j];
        const T gpj = g_prev != nullptr ? g_prev[j] : T(0);
        const bool column_has_mass = lbj != neg_inf<T>();
        T G_prev = 0;
        for (int i = 0; i < N; ++i) {
          const int64_t k = static_cast<int64_t>(i) * M + j;
          const T fi_minus_c = ft[i] - Cb[static_cast<int64_t>(i) * ldc + j];
          const T lai = la[i];
          const T pc = column_has_mass ? exp_t((fi_minus_c + gtj) * inv_eps - lbj) : T(0);
          const T pr = lai != neg_inf<T>() ? exp_t((fi_minus_c + gpj) * inv_eps - lai) : T(0);
          const T Fi = F[i];
          const T delta = Gj * pc + Fi * pr;
          gCb[k] = first ? delta : gCb[k] + delta;
          G_prev -= Fi * pr;
        }
        glb[j] = (first ? T(0) : glb[j]) + eps * Gj;
        G[j] = G_prev;
      }
    }
    __syncthreads();
  }
}

// Threads per block: a warp per ~4 rows or columns (every pass is warp-per-row or -column with C in shared memory),
// clamped to [4, 16] warps; for large problems, whose column passes are a thread per column, 512.
int block_threads(int64_t N, int64_t M) {
  const int64_t widest = N > M ? N : M;
  const int64_t warps = (widest + 3) / 4;
  return static_cast<int>(warps < 4 ? 4 : warps > kMaxWarps ? kMaxWarps : warps) * kWarpSize;
}

bool sizes_fit_int(int64_t B, int64_t N, int64_t M, int64_t n_iters) {
  return B >= 0 && N >= 0 && M >= 0 && n_iters >= 0 && B <= INT_MAX && N <= INT_MAX && M <= INT_MAX &&
         n_iters <= INT_MAX;
}

// Decides whether `dynamic_bytes` of dynamic shared memory fit next to the kernel's static shared memory on
// the current device, and if they exceed the default 48 KiB window, opts the kernel in to the device limit.
template <typename Kernel>
cudaError_t prepare_shared_memory(Kernel kernel, size_t dynamic_bytes, bool* fits) {
  int device = 0;
  int optin_bytes = 0;
  cudaFuncAttributes attributes{};
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&optin_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  }
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attributes, kernel);
  if (err != cudaSuccess) return err;
  const size_t dynamic_limit = static_cast<size_t>(optin_bytes) - attributes.sharedSizeBytes;
  *fits = dynamic_bytes <= dynamic_limit;
  if (*fits && dynamic_bytes > static_cast<size_t>(attributes.maxDynamicSharedSizeBytes)) {
    // Always the full limit (not dynamic_bytes), so concurrent callers never lower each other's setting.
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(dynamic_limit));
  }
  return err;
}

// The dynamic shared memory of a launch: the N + M vectors and C (N rows of stride shared_stride(M)) plus
// `cost_extra_bytes` (the backward's column partials) when all fit, else the vectors alone, else none (vectors
// in global memory). Sets *bytes and the two flags the kernels take.
template <typename Kernel>
cudaError_t choose_shared_memory(Kernel kernel, int64_t N, int64_t M, size_t item_bytes, size_t cost_extra_bytes,
                                 size_t* bytes, bool* vectors_in_shared, bool* cost_in_shared) {
  const size_t vector_bytes = static_cast<size_t>(N + M) * item_bytes;
  const size_t cost_bytes = static_cast<size_t>(N) * static_cast<size_t>(shared_stride(static_cast<int>(M))) * item_bytes;
  const size_t with_cost_bytes = vector_bytes + cost_bytes + cost_extra_bytes;
  cudaError_t err = prepare_shared_memory(kernel, with_cost_bytes, cost_in_shared);
  if (err != cudaSuccess) return err;
  if (*cost_in_shared) {
    *vectors_in_shared = true;
    *bytes = with_cost_bytes;
    return cudaSuccess;
  }
  err = prepare_shared_memory(kernel, vector_bytes, vectors_in_shared);
  *bytes = *vectors_in_shared ? vector_bytes : 0;
  return err;
}

}  // namespace

template <typename T>
cudaError_t sinkhorn_forward_cuda(const T* C, const T* log_a, const T* log_b, int64_t B, int64_t N, int64_t M,
                                  T eps, int64_t n_iters, T tol, T* f, T* g, T* f_hist, T* g_hist,
                                  int64_t* n_done, cudaStream_t stream) {
  if (!sizes_fit_int(B, N, M, n_iters) || n_iters < 1 || !(eps > T(0))) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  size_t shared_bytes = 0;
  bool in_shared = false, cost_in_shared = false;
  const cudaError_t err = choose_shared_memory(sinkhorn_forward_kernel<T>, N, M, sizeof(T), 0, &shared_bytes,
                                               &in_shared, &cost_in_shared);
  if (err != cudaSuccess) return err;
  sinkhorn_forward_kernel<T><<<static_cast<unsigned>(B), block_threads(N, M), shared_bytes, stream>>>(
      C, log_a, log_b, static_cast<int>(N), static_cast<int>(M), eps, static_cast<int>(n_iters), tol, in_shared,
      cost_in_shared, f, g, f_hist, g_hist, n_done);
  return cudaGetLastError();
}

template <typename T>
cudaError_t sinkhorn_backward_cuda(const T* C, const T* log_a, const T* log_b, const T* f_hist, const T* g_hist,
                                   const int64_t* n_done, const T* grad_f, const T* grad_g, int64_t B, int64_t N,
                                   int64_t M, T eps, int64_t n_iters, T* grad_C, T* grad_log_a, T* grad_log_b,
                                   T* workspace, cudaStream_t stream) {
  if (!sizes_fit_int(B, N, M, n_iters) || !(eps > T(0))) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  size_t shared_bytes = 0;
  bool in_shared = false, cost_in_shared = false;
  const int threads = block_threads(N, M);
  // The row-owned phase B's column partials (n_warps x M), used when M <= 256 (see the kernel).
  const size_t partial_bytes =
      M <= kLaneColumns * kWarpSize ? static_cast<size_t>(threads / kWarpSize) * M * sizeof(T) : 0;
  const cudaError_t err = choose_shared_memory(sinkhorn_backward_kernel<T>, N, M, sizeof(T), partial_bytes,
                                               &shared_bytes, &in_shared, &cost_in_shared);
  if (err != cudaSuccess) return err;
  if (!in_shared && workspace == nullptr) return cudaErrorInvalidValue;
  sinkhorn_backward_kernel<T><<<static_cast<unsigned>(B), threads, shared_bytes, stream>>>(
      C, log_a, log_b, f_hist, g_hist, n_done, grad_f, grad_g, static_cast<int>(N), static_cast<int>(M), eps,
      static_cast<int>(n_iters), in_shared, cost_in_shared, grad_C, grad_log_a, grad_log_b, workspace);
  return cudaGetLastError();
}

#define S2DC_INSTANTIATE_SINKHORN(T)                                                                           \
  template cudaError_t sinkhorn_forward_cuda<T>(const T*, const T*, const T*, int64_t, int64_t, int64_t, T,    \
                                                int64_t, T, T*, T*, T*, T*, int64_t*, cudaStream_t);           \
  template cudaError_t sinkhorn_backward_cuda<T>(const T*, const T*, const T*, const T*, const T*,             \
                                                 const int64_t*, const T*, const T*, int64_t, int64_t, int64_t, \
                                                 T, int64_t, T*, T*, T*, T*, cudaStream_t);

S2DC_INSTANTIATE_SINKHORN(float)
S2DC_INSTANTIATE_SINKHORN(double)

#undef S2DC_INSTANTIATE_SINKHORN

}  // namespace s2dc

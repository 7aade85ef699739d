// Fused log-domain Sinkhorn on the CPU (see sinkhorn.h for the contract).
//
// Base-2 units: the kernel holds p = f s, q = g s with s = log2(e) / eps, so an entry of a half-step is
// x_ij = q_j - s C_ij (one FMA) and its weight exp2(x_ij - shift) (fast_exp2: inline, vectorised).
//
// Kernel cache. Every weight either direction needs is exp2(x_i + y_j - s C_ij) for some row and column terms, so
// it is a rescaling of one cached matrix K_ij = exp2(w_j - s C_ij - u_i) (n x m scratch per solve, and KT = K^T):
//   exp2(x_i + y_j - s C_ij) = K_ij 2^(x_i + u_i) 2^(y_j - w_j).
// An iteration on the cache costs FMAs and n + m exponentials instead of n m. The cache is rebuilt (one
// exponential per entry) from the current iterate when a rescaling factor leaves [2^-F, 2^F] (F = 64 in float,
// 512 in double: no overflow) or a sum over cached entries may have lost weight to underflow (entries below
// 2^-125, 2^-1021 in double, are 0): a sum keeps its last ulp when it is at least 2^(min exponent + mantissa
// digits) times the sum of the factors of its terms. Near convergence the iterates barely move and the cache
// lasts; a sum that fails is never used.
//
// Forward, iteration t. Row half-step, as specified, with K built from w = q and a max shift u_i:
//   lse_i = u_i + log2 sum_j K_ij 2^(q_j - w_j),  p_i = log2 a_i - lse_i
// (on a fresh cache the sum is exactly sum_j exp2(q_j - s C_ij - max_i)). Column half-step, from the same entries:
//   LSE2_i(p_i - s C_ij) = log2 A_j - w_j,  A_j = sum_i alpha_i K_ij,  alpha_i = 2^(p_i + u_i),
// alpha_i taken from the rounded p_i so that A_j is the column sum of the stored p, as in the plain loop. A column
// whose A_j fails the underflow test (no weight near its best row) is recomputed from C with its own max shift,
// which is also the path of degenerate problems without mass.
//
// Backward, iteration t: the column-normalised weights of g^t, Pc_ij = softmax_i(p_i - s C_ij), and the
// row-normalised weights of f^t, Pr_ij = softmax_j(q'_j - s C_ij) (q' = q^(t-1)), both as cache entries rescaled
// and renormalised by their sums. A rebuilt cache holds exp2(p_i + q_j - log2 b_j - s C_ij). Renormalising makes
// the weights sum to 1 to rounding although the iterates were rounded to cost units in between; otherwise that
// error is integrated over the iterations. Rows whose Pr sum fails (a tiny mass a_i, or t = 1 where q' = 0 also
// weighs zero-mass columns) evaluate Pr directly.
//
// Matrix-vector products with the cache (the row sums K beta, the column sums alpha K, and their backward
// counterparts) are all sums of scaled rows, of K or of its transpose KT kept beside it: vertical vector FMAs, four
// rows per pass, with no horizontal reduction per row (which costs more than the row itself at n, m ~ 100). These
// sums are cascaded over blocks of rows: plain running sums over hundreds of rows drop small terms with a bias of
// ~1e-7 that the iterations would integrate along the gauge (f + c, g - c). The per-row and per-column scalars
// (log2, exp2 and the rescaling factors) are vector loops too (fast_log2, fast_exp2).
//
// Memory: O(n + m) plus the cache and its transpose (2 n m) per solve. Traffic per iteration: C once (a rebuild)
// or the cache twice in the forward; the cache three times and grad_C once in the backward.
#include "sinkhorn.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include "vector_math.h"
#include "target_clones.h"  // each sweep is compiled per instruction set

namespace s2dc::cpu {
namespace {

template <typename T>
constexpr T kInf = std::numeric_limits<T>::infinity();

constexpr double kLog2e = 1.442695040888963407359924681001892137;

// Rows per block of the cascaded sums over rows.
constexpr int64_t kRowBlock = 16;

// Cache rescaling factors stay within [2^-F, 2^F].
template <typename T>
constexpr T kMaxFactorExponent = sizeof(T) == 4 ? T(64) : T(512);

// A sum of cached entries times factors of total `factor_sum` keeps its last ulp above this bound.
template <typename T>
T underflow_bound(T factor_sum) {
  return std::ldexp(factor_sum, static_cast<int>(Exp2Traits<T>::kMinExponent) + std::numeric_limits<T>::digits);
}

// The max shift of a log-sum-exp, 0 where the max is infinite (as torch.logsumexp): all terms -inf give sum 0
// and LSE -inf, a +inf term gives LSE +inf, never NaN.
template <typename T>
[[gnu::always_inline]] inline T finite_shift(T max) {
  return std::isinf(max) ? T(0) : max;
}

// weights_j = exp2(x_j - shift) for x_j = v_j - s c_j, shift = max_j x_j (two passes over the row); returns
// {shift, sum_j weights_j}.
template <typename T>
[[gnu::always_inline]] inline std::pair<T, T> row_exp2(const T* __restrict c, const T* __restrict v, int64_t m,
                                                       T scale, T* __restrict weights) {
  T max = -kInf<T>;
#pragma omp simd reduction(max : max)
  for (int64_t j = 0; j < m; ++j) max = std::max(max, v[j] - scale * c[j]);
  const T shift = finite_shift(max);
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < m; ++j) {
    const T e = fast_exp2(v[j] - scale * c[j] - shift);
    weights[j] = e;
    sum += e;
  }
  return {shift, sum};
}

// y[v]_k = sum_r coef[v]_r R_rk (k < len, v < V) over the count rows of the row-major R: V matrix-vector products
// in one pass over R as sums of scaled rows, so that every operation is a vertical vector FMA (a product with the
// transposed cache replaces a dot product per row and its horizontal reduction). Four rows per pass over block
// (V x len, scratch); each block of kRowBlock rows is then added into y (cascaded sums, see the top of the file).
template <int V, typename T>
[[gnu::always_inline]] inline void sum_scaled_rows(const T* __restrict R, const T* const (&coef)[V], int64_t count,
                                                   int64_t len, T* const (&y)[V], T* __restrict block) {
  for (int v = 0; v < V; ++v) std::fill(y[v], y[v] + len, T(0));
  for (int64_t first = 0; first < count; first += kRowBlock) {
    const int64_t end = std::min(count, first + kRowBlock);
    std::fill(block, block + V * len, T(0));
    int64_t r = first;
    for (; r + 4 <= end; r += 4) {
      const T* __restrict r0 = R + r * len;
      const T* __restrict r1 = r0 + len;
      const T* __restrict r2 = r1 + len;
      const T* __restrict r3 = r2 + len;
      for (int v = 0; v < V; ++v) {
        const T c0 = coef[v][r], c1 = coef[v][r + 1], c2 = coef[v][r + 2], c3 = coef[v][r + 3];
        T* __restrict b = block + v * len;
#pragma omp simd
        for (int64_t k = 0; k < len; ++k) b[k] += (c0 * r0[k] + c1 * r1[k]) + (c2 * r2[k] + c3 * r3[k]);
      }
    }
    for (; r < end; ++r) {
      const T* __restrict r0 = R + r * len;
      for (int v = 0; v < V; ++v) {
        const T c0 = coef[v][r];
        T* __restrict b = block + v * len;
#pragma omp simd
        for (int64_t k = 0; k < len; ++k) b[k] += c0 * r0[k];
      }
    }
    for (int v = 0; v < V; ++v) {
      T* __restrict out = y[v];
      const T* __restrict b = block + v * len;
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) out[k] += b[k];
    }
  }
}

// KT = K^T for the row-major n x m K, in 16 x 16 tiles (a tile's rows and columns stay in cache).
template <typename T>
[[gnu::always_inline]] inline void transpose(const T* __restrict K, int64_t n, int64_t m, T* __restrict KT) {
  constexpr int64_t kTile = 16;
  for (int64_t i0 = 0; i0 < n; i0 += kTile) {
    for (int64_t j0 = 0; j0 < m; j0 += kTile) {
      const int64_t i1 = std::min(n, i0 + kTile), j1 = std::min(m, j0 + kTile);
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t i = i0; i < i1; ++i) KT[j * n + i] = K[i * m + j];
      }
    }
  }
}

// Cache rescaling factors 2^(target_k - reference_k) for k < count into factors: 0 where the target is -inf (no
// mass), +inf where out of range (also a finite target on a -inf reference). Returns whether all are in range.
template <typename T>
S2DC_TARGET_CLONES bool rescaling_factors(const T* __restrict target, const T* __restrict reference, int64_t count,
                                          T* __restrict factors) {
  int64_t out_of_range = 0;
#pragma omp simd reduction(+ : out_of_range)
  for (int64_t k = 0; k < count; ++k) {
    const T exponent = target[k] - reference[k];
    const bool no_mass = target[k] == -kInf<T>;
    const bool ok = std::abs(exponent) <= kMaxFactorExponent<T>;  // false for NaN (-inf - -inf)
    factors[k] = no_mass ? T(0) : ok ? fast_exp2(exponent) : kInf<T>;
    out_of_range += !(ok || no_mass);
  }
  return out_of_range == 0;
}

// sum_k x_k (a vector reduction).
template <typename T>
S2DC_TARGET_CLONES T sum_of(const T* __restrict x, int64_t count) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < count; ++k) sum += x[k];
  return sum;
}

// LSE2_i(p_i - s C_ij) of column j from C itself (stride m), with its own max shift.
template <typename T>
T column_lse2(const T* cost, int64_t n, int64_t m, T scale, const T* p, int64_t j) {
  T max = -kInf<T>;
  for (int64_t i = 0; i < n; ++i) max = std::max(max, p[i] - scale * cost[i * m + j]);
  const T shift = finite_shift(max);
  T sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += fast_exp2(p[i] - scale * cost[i * m + j] - shift);
  return shift + std::log2(sum);
}

// The forward row half-step of one iteration and the column sums A_j (see the top of the file), in three
// passes: the row sums, then the per-row scalars (independent, so their log2 and exp2 vectorise), then the column
// sums. With beta null it rebuilds the cache (K and its transpose KT, u) from q; else it reads K rescaled by
// beta_j = 2^(q_j - w_j) and returns false if a row sum fails row_bound (the caller then rebuilds). Writes p_next
// (n), col_sums (m) and, when want_error, *error = sum_i |exp2(p_i + lse_i) - a_i|, the row-marginal error of p;
// row_sums, alpha (n) and block (max(n, m)) are scratch.
template <typename T>
S2DC_TARGET_CLONES bool forward_rows(const T* __restrict cost, int64_t n, int64_t m, T scale, const T* __restrict q,
                                     const T* __restrict beta, T row_bound, const T* __restrict a,
                                     const T* __restrict log2_a, const T* __restrict p, bool want_error,
                                     T* __restrict error, T* __restrict K, T* __restrict KT, T* __restrict u,
                                     T* __restrict p_next, T* __restrict row_sums, T* __restrict alpha,
                                     T* __restrict block, T* __restrict col_sums) {
  if (beta == nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const auto [shift, sum] = row_exp2(cost + i * m, q, m, scale, K + i * m);
      u[i] = shift;
      row_sums[i] = sum;
    }
    transpose(K, n, m, KT);
  } else {
    sum_scaled_rows<1>(KT, {beta}, m, n, {row_sums}, block);
    int64_t failed = 0;
#pragma omp simd reduction(+ : failed)
    for (int64_t i = 0; i < n; ++i) failed += !(row_sums[i] >= row_bound);
    if (failed > 0) return false;
  }
  T row_error = 0;
#pragma omp simd reduction(+ : row_error)
  for (int64_t i = 0; i < n; ++i) {
    const T lse = u[i] + fast_log2(row_sums[i]);
    row_error += std::abs(fast_exp2(p[i] + lse) - a[i]);
    p_next[i] = log2_a[i] - lse;
    // Zero-mass rows add nothing (a degenerate row sum 0 makes A_j NaN: recomputed, see above).
    alpha[i] = a[i] > 0 ? static_cast<T>(fast_exp2(double(p_next[i]) + double(u[i]))) : T(0);  // exact sum
  }
  *error = want_error ? row_error : T(0);
  sum_scaled_rows<1>(K, {alpha}, n, m, {col_sums}, block);
  return true;
}

// The forward column half-step from the cached column sums: q_j = log2 b_j + w_j - log2 A_j (the caller redoes
// the columns whose A_j fails the underflow test).
template <typename T>
S2DC_TARGET_CLONES void column_potentials(const T* __restrict log2_b, const T* __restrict w,
                                          const T* __restrict col_sums, int64_t m, T* __restrict q) {
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) q[j] = log2_b[j] + w[j] - fast_log2(col_sums[j]);
}

// Backward sweep 1 of iteration t: the column sums col_sums_j = sum_i x_i K_ij, the normalisers of Pc. With rebuild
// it first rebuilds the cache, K_ij = exp2(p_i + col_shift_j - s C_ij) for rows with mass and 0 for the others (so
// u = -p, w = col_shift; the caller sets x = 1), and its transpose KT. block (max(n, m)) is scratch.
template <typename T>
S2DC_TARGET_CLONES void backward_sums(const T* __restrict cost, int64_t n, int64_t m, T scale,
                                      const T* __restrict p, const T* __restrict log2_a,
                                      const T* __restrict col_shift, bool rebuild, const T* __restrict x,
                                      T* __restrict K, T* __restrict KT, T* __restrict block,
                                      T* __restrict col_sums) {
  if (rebuild) {
    for (int64_t i = 0; i < n; ++i) {
      T* __restrict k_row = K + i * m;
      if (log2_a[i] == -kInf<T>) {
        std::fill(k_row, k_row + m, T(0));
        continue;
      }
      const T* __restrict c = cost + i * m;
      const T pi = p[i];
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) k_row[j] = fast_exp2(pi + col_shift[j] - scale * c[j]);
    }
    transpose(K, n, m, KT);
  }
  sum_scaled_rows<1>(K, {x}, n, m, {col_sums}, block);
}

// Backward sweep 2 of iteration t, with Pc_ij = K_ij x_i col_norm_j and Pr_ij = K_ij z_j / row_sums_i (row_sums_i =
// sum_j K_ij z_j), or softmax_j(q'_j - s C_ij) evaluated directly when row_sums_i fails row_bound. With G the
// adjoint of g^t: F_i -= sum_j G_j Pc_ij (dg_j/df_i = -Pc_ij; F_i is then the adjoint of f^t), grad_log_a_i +=
// eps F_i, grad_C_ij += G_j Pc_ij + F_i Pr_ij (dg_j/dC_ij = Pc_ij, df_i/dC_ij = Pr_ij), and G_prev_j = -sum_i F_i
// Pr_ij (df_i/dg'_j = -Pr_ij). Rows without mass have Pc = Pr = 0. The sums over the cache are products with KT (the
// two row sums in one pass) and K as sums of scaled rows; the update of grad_C is then elementwise. gc (m),
// row_sums (n), row_terms (n), z_finite (m), direct (m) and block (2 max(n, m)) are scratch.
template <typename T>
S2DC_TARGET_CLONES void adjoint_rows(const T* __restrict cost, int64_t n, int64_t m, T scale, T eps,
                                     const T* __restrict log2_a, const T* __restrict K, const T* __restrict KT,
                                     const T* __restrict x, const T* __restrict col_norm, const T* __restrict z,
                                     T row_bound, const T* __restrict q_prev, const T* __restrict G,
                                     T* __restrict F, T* __restrict gc, T* __restrict row_sums,
                                     T* __restrict row_terms, T* __restrict z_finite, T* __restrict direct, T* __restrict grad_cost,
                                     T* __restrict grad_log_a, T* __restrict block, T* __restrict G_prev) {
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) gc[j] = G[j] * col_norm[j];
  sum_scaled_rows<2>(KT, {z, gc}, m, n, {row_sums, row_terms}, block);  // sum_j K_ij z_j, sum_j K_ij gc_j
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const bool mass = log2_a[i] != -kInf<T>;
    F[i] -= mass ? x[i] * row_terms[i] : T(0);
    grad_log_a[i] += eps * F[i];
    const bool cached = row_sums[i] >= row_bound && row_sums[i] < kInf<T>;
    row_terms[i] = mass && cached ? F[i] / row_sums[i] : T(0);  // F_i / row_sums_i: Pr from the cache
  }
  // z with its infinite factors as 0: a row whose Pr weighs such a column has an infinite or NaN row sum, so it is
  // evaluated directly, and the cached rows have K_ij = 0 there.
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) z_finite[j] = z[j] < kInf<T> ? z[j] : T(0);
  const T* __restrict zs = z_finite;
  // One pass over K, four rows at a time: grad_C_ij += K_ij (x_i gc_j + h_i zs_j) and G_prev_j = -zs_j sum_i h_i K_ij
  // (h_i = row_terms_i, 0 for the rows evaluated directly; rows without mass have K_ij = 0), cascaded as in
  // sum_scaled_rows.
  std::fill(G_prev, G_prev + m, T(0));
  for (int64_t first = 0; first < n; first += kRowBlock) {
    const int64_t end = std::min(n, first + kRowBlock);
    std::fill(block, block + m, T(0));
    int64_t i = first;
    for (; i + 4 <= end; i += 4) {
      const T* __restrict k0 = K + i * m;
      const T* __restrict k1 = k0 + m;
      const T* __restrict k2 = k1 + m;
      const T* __restrict k3 = k2 + m;
      T* __restrict g0 = grad_cost + i * m;
      T* __restrict g1 = g0 + m;
      T* __restrict g2 = g1 + m;
      T* __restrict g3 = g2 + m;
      const T x0 = x[i], x1 = x[i + 1], x2 = x[i + 2], x3 = x[i + 3];
      const T h0 = row_terms[i], h1 = row_terms[i + 1], h2 = row_terms[i + 2], h3 = row_terms[i + 3];
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) {
        block[j] += (h0 * k0[j] + h1 * k1[j]) + (h2 * k2[j] + h3 * k3[j]);
        g0[j] += k0[j] * (x0 * gc[j] + h0 * zs[j]);
        g1[j] += k1[j] * (x1 * gc[j] + h1 * zs[j]);
        g2[j] += k2[j] * (x2 * gc[j] + h2 * zs[j]);
        g3[j] += k3[j] * (x3 * gc[j] + h3 * zs[j]);
      }
    }
    for (; i < end; ++i) {
      const T* __restrict k0 = K + i * m;
      T* __restrict g0 = grad_cost + i * m;
      const T x0 = x[i], h0 = row_terms[i];
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) {
        block[j] += h0 * k0[j];
        g0[j] += k0[j] * (x0 * gc[j] + h0 * zs[j]);
      }
    }
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) G_prev[j] += block[j];
  }
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) G_prev[j] *= -zs[j];
  // The rows evaluated directly: their Pr part, from C.
  for (int64_t i = 0; i < n; ++i) {
    if (log2_a[i] == -kInf<T> || (row_sums[i] >= row_bound && row_sums[i] < kInf<T>)) continue;
    const T f_over_sum = F[i] / row_exp2(cost + i * m, q_prev, m, scale, direct).second;
    T* __restrict grad_c = grad_cost + i * m;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      grad_c[j] += f_over_sum * direct[j];
      G_prev[j] -= f_over_sum * direct[j];
    }
  }
}

// One problem in base-2 units: the cost scale s and the marginals.
template <typename T>
struct Base2Problem {
  const T* cost;
  int64_t n, m;
  T scale;                           // s = log2(e) / eps
  std::vector<T> a, log2_a, log2_b;  // a_i, log2 a_i, log2 b_j

  explicit Base2Problem(const SinkhornProblem<T>& problem)
      : cost(problem.cost), n(problem.n), m(problem.m), scale(T(kLog2e) / problem.eps), a(n), log2_a(n), log2_b(m) {
    for (int64_t i = 0; i < n; ++i) {
      a[i] = std::exp(problem.log_a[i]);
      log2_a[i] = T(kLog2e) * problem.log_a[i];
    }
    for (int64_t j = 0; j < m; ++j) log2_b[j] = T(kLog2e) * problem.log_b[j];
  }
};

}  // namespace

template <typename T>
int64_t sinkhorn_forward(const SinkhornProblem<T>& problem, int64_t n_iters, T tol, T* f, T* g, T* f_hist,
                         T* g_hist) {
  const Base2Problem<T> b2(problem);
  const int64_t n = b2.n, m = b2.m;
  const T to_cost = problem.eps / T(kLog2e);  // f = p eps ln 2
  const T col_bound = underflow_bound(std::accumulate(b2.a.begin(), b2.a.end(), T(0)));
  std::vector<T> p(n, T(0)), p_next(n), q(m, T(0)), K(n * m), KT(n * m), u(n), w(m), beta(m), row_sums(n), alpha(n),
      block(std::max(n, m)), col_sums(m);
  bool cached = false;
  int64_t done = 0;
  for (int64_t t = 1; t <= n_iters; ++t) {
    const bool check = tol > 0 && t > 1;
    T error = 0;
    const auto rows = [&](const T* factors, T row_bound) {
      return forward_rows(b2.cost, n, m, b2.scale, q.data(), factors, row_bound, b2.a.data(), b2.log2_a.data(),
                          p.data(), check, &error, K.data(), KT.data(), u.data(), p_next.data(), row_sums.data(),
                          alpha.data(), block.data(), col_sums.data());
    };
    cached = cached && rescaling_factors(q.data(), w.data(), m, beta.data()) &&
             rows(beta.data(), underflow_bound(sum_of(beta.data(), m)));
    if (!cached) {
      rows(nullptr, T(0));
      w = q;
      cached = true;
    }
    if (check && error < tol) break;
    std::swap(p, p_next);
    column_potentials(b2.log2_b.data(), w.data(), col_sums.data(), m, q.data());
    for (int64_t j = 0; j < m; ++j) {
      if (!(col_sums[j] > 0 && col_sums[j] >= col_bound)) {
        q[j] = b2.log2_b[j] - column_lse2(b2.cost, n, m, b2.scale, p.data(), j);
      }
    }
    done = t;
    T* f_t = f_hist + (t - 1) * n;
    T* g_t = g_hist + (t - 1) * m;
    for (int64_t i = 0; i < n; ++i) f_t[i] = to_cost * p[i];
    for (int64_t j = 0; j < m; ++j) g_t[j] = to_cost * q[j];
  }
  for (int64_t i = 0; i < n; ++i) f[i] = to_cost * p[i];
  for (int64_t j = 0; j < m; ++j) g[j] = to_cost * q[j];
  return done;
}

template <typename T>
void sinkhorn_backward(const SinkhornProblem<T>& problem, const T* f_hist, const T* g_hist, int64_t n_done,
                       const T* grad_f, const T* grad_g, T* grad_cost, T* grad_log_a, T* grad_log_b) {
  const Base2Problem<T> b2(problem);
  const int64_t n = b2.n, m = b2.m;
  const T eps = problem.eps;
  std::fill(grad_cost, grad_cost + n * m, T(0));
  std::fill(grad_log_a, grad_log_a + n, T(0));
  std::fill(grad_log_b, grad_log_b + m, T(0));
  // F, G: adjoints of f^t, g^t (G_prev receives that of g^(t-1)); p = f^t s, q_prev = g^(t-1) s; the cache K with
  // its row and column terms u = -p, w = col_shift of the iteration that built it; col_norm: the column sums of
  // Pc, then their inverses.
  std::vector<T> F(n), G(grad_g, grad_g + m), G_prev(m), p(n), col_shift(m), q_prev(m), K(n * m), KT(n * m),
      minus_u(n), w(m), x(n), z(m), col_norm(m), row_sums(n), gc(m), row_terms(n), z_finite(m), direct(m), block(2 * std::max(n, m));
  bool cached = false;
  for (int64_t t = n_done; t >= 1; --t) {
    const T* f_t = f_hist + (t - 1) * n;
    const T* g_t = g_hist + (t - 1) * m;
    for (int64_t i = 0; i < n; ++i) {
      p[i] = b2.scale * f_t[i];
      F[i] = t == n_done ? grad_f[i] : T(0);
    }
    for (int64_t j = 0; j < m; ++j) {
      col_shift[j] = b2.log2_b[j] == -kInf<T> ? -kInf<T> : b2.scale * g_t[j] - b2.log2_b[j];
      q_prev[j] = t > 1 ? b2.scale * g_hist[(t - 2) * m + j] : T(0);
      grad_log_b[j] += eps * G[j];
    }
    const auto sums = [&](bool rebuild) {
      backward_sums(b2.cost, n, m, b2.scale, p.data(), b2.log2_a.data(), col_shift.data(), rebuild, x.data(),
                    K.data(), KT.data(), block.data(), col_norm.data());
    };
    cached = cached && rescaling_factors(p.data(), minus_u.data(), n, x.data()) &&
             rescaling_factors(q_prev.data(), w.data(), m, z.data());
    if (cached) {
      sums(false);
      const T col_bound = underflow_bound(sum_of(x.data(), n));
      for (int64_t j = 0; j < m && cached; ++j) cached = col_shift[j] == -kInf<T> || col_norm[j] >= col_bound;
    }
    if (!cached) {  // out-of-range z (t = 1 with zero-mass columns) fail the row sums below: direct Pr
      minus_u = p;
      w = col_shift;
      std::fill(x.begin(), x.end(), T(1));
      rescaling_factors(q_prev.data(), w.data(), m, z.data());
      sums(true);
      cached = true;
    }
    for (int64_t j = 0; j < m; ++j) col_norm[j] = col_norm[j] > 0 ? T(1) / col_norm[j] : T(0);  // 0: no mass
    const T row_bound = underflow_bound(sum_of(z.data(), m));
    adjoint_rows(b2.cost, n, m, b2.scale, eps, b2.log2_a.data(), K.data(), KT.data(), x.data(), col_norm.data(),
                 z.data(), row_bound, q_prev.data(), G.data(), F.data(), gc.data(), row_sums.data(),
                 row_terms.data(), z_finite.data(), direct.data(), grad_cost, grad_log_a, block.data(), G_prev.data());
    std::swap(G, G_prev);
  }
}

template int64_t sinkhorn_forward<float>(const SinkhornProblem<float>&, int64_t, float, float*, float*, float*,
                                         float*);
template int64_t sinkhorn_forward<double>(const SinkhornProblem<double>&, int64_t, double, double*, double*,
                                          double*, double*);
template void sinkhorn_backward<float>(const SinkhornProblem<float>&, const float*, const float*, int64_t,
                                       const float*, const float*, float*, float*, float*);
template void sinkhorn_backward<double>(const SinkhornProblem<double>&, const double*, const double*, int64_t,
                                        const double*, const double*, double*, double*, double*);

}  // namespace s2dc::cpu

// -------------------------------------------------------------- Sinkhorn-Knopp (SwAV / DINOv2) on logits
// (see sinkhorn.h for the contract). Every log-sum-exp is exact: an online max shift per column (column
// half-step) or per row (row half-step), the running sum rescaled by exp2(old shift - new shift) when the max
// grows, so each entry costs one exponential per half-step and the logits are read once.
//
// Column half-step, per chunk of W columns (kKnoppColumnChunk): the B rows are walked in blocks of 16; per block,
// the block max of every column (vertical vector maxima over the W columns), the running max updated and the
// running sums rescaled (W exponentials per 16 rows), then exp2(p_i + x_ik - shift_k) of the block's rows added
// while the block (16 x W entries, 32 KB) is still in L1. Row half-step, per row: the same in blocks of
// kKnoppRowBlock columns (block max, then the shifted sum of the block, still in L1). Plan: one pass per row.
//
// Rounding: a potential is stored as (-log2 n - log2 sum) - shift, one rounding at the magnitude of the shift, and
// the plan adds p_i to q_k + x_ik (the term of the row half-step, close to -p_i on the largest entries, where the
// sum is exact): in float, Q is within a few ulps of |x| (relative) of the exact plan.
//
// Memory: O(1) scratch (stack) per call. DRAM traffic per half-step: the logits once; the plan reads them once
// and writes Q once.
namespace s2dc::cpu {
namespace {

// Columns per block of the row half-step (4 KB of float logits and of q: in L1 for the second pass).
constexpr int64_t kKnoppRowBlock = 1024;

// finite_shift for vector loops (a comparison and a select): the max shift, 0 where the max is infinite.
template <typename T>
[[gnu::always_inline]] inline T vector_finite_shift(T max) {
  return std::abs(max) < kInf<T> ? max : T(0);
}

// q_k = -log2 K - LSE2_i(p_i + x_ik) for the `width` <= kKnoppColumnChunk columns from `col`.
template <typename T>
S2DC_TARGET_CLONES void knopp_column_chunk(const T* __restrict logits, int64_t B, int64_t K, T scale,
                                           const T* __restrict p, T log2_K, int64_t col, int64_t width,
                                           T* __restrict q) {
  constexpr int64_t W = kKnoppColumnChunk<T>;
  alignas(64) T max[W], shift[W], sum[W], block_max[W];
  std::fill(max, max + width, -kInf<T>);
  std::fill(sum, sum + width, T(0));
  const T* __restrict chunk = logits + col;
  for (int64_t first = 0; first < B; first += kRowBlock) {
    const int64_t end = std::min(B, first + kRowBlock);
    std::fill(block_max, block_max + width, -kInf<T>);
    for (int64_t i = first; i < end; ++i) {
      const T* __restrict row = chunk + i * K;
      const T pi = p[i];
#pragma omp simd
      for (int64_t k = 0; k < width; ++k) block_max[k] = std::max(block_max[k], pi + scale * row[k]);
    }
    // New shift; the old sum rescaled (a select, not a product, where it is empty: 0 * inf would be NaN).
#pragma omp simd
    for (int64_t k = 0; k < width; ++k) {
      const T new_max = std::max(max[k], block_max[k]);
      const T new_shift = vector_finite_shift(new_max);
      const T factor = fast_exp2(vector_finite_shift(max[k]) - new_shift);
      sum[k] = max[k] == -kInf<T> ? T(0) : sum[k] * factor;
      max[k] = new_max;
      shift[k] = new_shift;
    }
    for (int64_t i = first; i < end; ++i) {
      const T* __restrict row = chunk + i * K;
      const T pi = p[i];
#pragma omp simd
      for (int64_t k = 0; k < width; ++k) sum[k] += fast_exp2(pi + scale * row[k] - shift[k]);
    }
  }
#pragma omp simd
  for (int64_t k = 0; k < width; ++k) q[col + k] = (-log2_K - fast_log2(sum[k])) - vector_finite_shift(max[k]);
}

// -log2 B - LSE2_k(q_k + x_k) of one row x = scale * row.
template <typename T>
S2DC_TARGET_CLONES T knopp_row_potential(const T* __restrict row, int64_t K, T scale, const T* __restrict q,
                                         T log2_B) {
  T max = -kInf<T>, sum = 0;
  for (int64_t first = 0; first < K; first += kKnoppRowBlock) {
    const int64_t end = std::min(K, first + kKnoppRowBlock);
    T block_max = -kInf<T>;
#pragma omp simd reduction(max : block_max)
    for (int64_t k = first; k < end; ++k) block_max = std::max(block_max, q[k] + scale * row[k]);
    const T new_max = std::max(max, block_max);
    const T shift = finite_shift(new_max);
    T block_sum = 0;
#pragma omp simd reduction(+ : block_sum)
    for (int64_t k = first; k < end; ++k) block_sum += fast_exp2(q[k] + scale * row[k] - shift);
    sum = (max == -kInf<T> ? T(0) : sum * std::exp2(finite_shift(max) - shift)) + block_sum;
    max = new_max;
  }
  return (-log2_B - std::log2(sum)) - finite_shift(max);
}

// Q_k = exp2(q_k + x_k + p + log2 B) of one row x = scale * row, summed in this order: q_k + x_k is the term of
// the row half-step, close to -p on the largest entries, where adding p is then exact.
template <typename T>
S2DC_TARGET_CLONES void knopp_plan_row(const T* __restrict row, int64_t K, T scale, const T* __restrict q, T p,
                                       T log2_B, T* __restrict out) {
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) out[k] = fast_exp2(((q[k] + scale * row[k]) + p) + log2_B);
}

}  // namespace

template <typename T>
void knopp_column_update(const T* logits, int64_t B, int64_t K, T scale, const T* p, T* q, int64_t col_begin,
                         int64_t col_end) {
  const T log2_K = std::log2(T(K));
  for (int64_t col = col_begin; col < col_end; col += kKnoppColumnChunk<T>) {
    knopp_column_chunk(logits, B, K, scale, p, log2_K, col, std::min(kKnoppColumnChunk<T>, col_end - col), q);
  }
}

template <typename T>
void knopp_row_update(const T* logits, int64_t B, int64_t K, T scale, const T* q, T* p, int64_t row_begin,
                      int64_t row_end) {
  const T log2_B = std::log2(T(B));
  for (int64_t i = row_begin; i < row_end; ++i) p[i] = knopp_row_potential(logits + i * K, K, scale, q, log2_B);
}

template <typename T>
void knopp_plan(const T* logits, int64_t B, int64_t K, T scale, const T* p, const T* q, T* Q, int64_t row_begin,
                int64_t row_end) {
  const T log2_B = std::log2(T(B));
  for (int64_t i = row_begin; i < row_end; ++i) knopp_plan_row(logits + i * K, K, scale, q, p[i], log2_B, Q + i * K);
}

template void knopp_column_update<float>(const float*, int64_t, int64_t, float, const float*, float*, int64_t,
                                         int64_t);
template void knopp_column_update<double>(const double*, int64_t, int64_t, double, const double*, double*, int64_t,
                                          int64_t);
template void knopp_row_update<float>(const float*, int64_t, int64_t, float, const float*, float*, int64_t, int64_t);
template void knopp_row_update<double>(const double*, int64_t, int64_t, double, const double*, double*, int64_t,
                                       int64_t);
template void knopp_plan<float>(const float*, int64_t, int64_t, float, const float*, const float*, float*, int64_t,
                                int64_t);
template void knopp_plan<double>(const double*, int64_t, int64_t, double, const double*, const double*, double*,
                                 int64_t, int64_t);

}  // namespace s2dc::cpu

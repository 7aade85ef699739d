// Fused neighbourhood-consistency loss on the CPU (see neighborhood.h for the contract).
//
// Forward, per valid row i: J_i is picked from the teacher Gram row by k rounds of a vectorised (max, first index
// of the max) over the remaining candidates, ranked by <T_i, T_j> / |T_j| (the cosine times |T_i|, the same order
// within the row; cost k n per row, branch-free: measured faster than an insertion list at N = 144); the cosines
// are recovered as that score / |T_i|. The student similarities are computed only for the k chosen pairs (k dot
// products of length d, four at a time), then both softmaxes over J_i in the log domain (max-shifted log-sum-exp,
// one exponential per entry) and KL(p_i || q_i) = sum p (log p - log q).
// Backward, with c_ij = scale (q_i(j) - p_i(j)) and unit rows u = S / max(|S|, 1e-12):
//   G_i = sum over the chosen pairs (i, j) of c_ij u_j + sum over the pairs (j, i) of c_ji u_j   (G = dL/du),
//   dL/dS_i = (G_i - u_i <u_i, G_i>) / |S_i|   (G_i / 1e-12 for a row whose norm is clamped).
// The pairs are first sorted by the row they reach (lists of (source row, coefficient), 2 n k entries), so each
// gradient row is accumulated in a buffer that stays in L1 and written once, with no scatter.
// Traffic: the forward reads each Gram row once and k student rows per row; the backward reads 2 k student rows
// per row on average (from L2: a problem's rows fit) and writes each gradient row once.
#include "neighborhood.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "target_clones.h"  // the dot and axpy loops are compiled per instruction set

namespace s2dc::cpu {
namespace {

constexpr double kNormEps = 1e-12;  // F.normalize's clamp of the norm

template <typename T>
[[gnu::always_inline]] inline T dot(const T* __restrict a, const T* __restrict b, int64_t d) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t l = 0; l < d; ++l) sum += a[l] * b[l];
  return sum;
}

// out[m] = <a, rows[index[m]]> for m < 4: four independent accumulation chains (one would wait on the latency of
// each vector multiply-add), a read once for all four.
template <typename T>
[[gnu::always_inline]] inline void dot4(const T* __restrict a, const T* __restrict rows, const int64_t* index,
                                        int64_t d, T* out) {
  const T* __restrict b0 = rows + index[0] * d;
  const T* __restrict b1 = rows + index[1] * d;
  const T* __restrict b2 = rows + index[2] * d;
  const T* __restrict b3 = rows + index[3] * d;
  T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t l = 0; l < d; ++l) {
    s0 += a[l] * b0[l];
    s1 += a[l] * b1[l];
    s2 += a[l] * b2[l];
    s3 += a[l] * b3[l];
  }
  out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

// y += alpha x
template <typename T>
[[gnu::always_inline]] inline void axpy(T alpha, const T* __restrict x, T* __restrict y, int64_t d) {
#pragma omp simd
  for (int64_t l = 0; l < d; ++l) y[l] += alpha * x[l];
}

// log sum_l exp(x_l) of k finite values.
template <typename T>
[[gnu::always_inline]] inline T log_sum_exp(const T* x, int64_t k) {
  T top = x[0];
  for (int64_t l = 1; l < k; ++l) top = std::max(top, x[l]);
  T sum = 0;
  for (int64_t l = 0; l < k; ++l) sum += std::exp(x[l] - top);
  return top + std::log(sum);
}

// Lanes of the max reduction (GCC vectorises a float max reduction only as lane-wise maxima).
constexpr int64_t kLanes = 16;

int64_t padded_length(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// max of x[0 .. n), n a multiple of kLanes: kLanes running maxima (vector compares), then their maximum.
template <typename T>
[[gnu::always_inline]] inline T max_of(const T* __restrict x, int64_t n) {
  T lanes[kLanes];
  std::copy_n(x, kLanes, lanes);
  for (int64_t begin = kLanes; begin < n; begin += kLanes) {
#pragma omp simd
    for (int64_t m = 0; m < kLanes; ++m) lanes[m] = x[begin + m] > lanes[m] ? x[begin + m] : lanes[m];
  }
  T best = lanes[0];
  for (int64_t m = 1; m < kLanes; ++m) best = std::max(best, lanes[m]);
  return best;
}

// Scratch of 4 k + padded_length(n) values: the teacher and student logits of one row, their shifted
// exponentials, and the row's ranking scores (padded with -inf).
template <typename T>
S2DC_TARGET_CLONES T forward_rows(const NeighborhoodProblem<T>& problem, const T* __restrict teacher_gram,
                                  int64_t ld, int64_t row0, int64_t rows, int64_t* __restrict neighbours,
                                  T* __restrict weights, T* __restrict scratch) {
  const int64_t n = problem.n, d = problem.d, k = problem.k;
  const T* __restrict t_inv = problem.teacher_inverse_norms;
  const T* __restrict s_inv = problem.student_inverse_norms;
  const T* __restrict student = problem.student;
  const bool* __restrict valid = problem.valid;
  T* __restrict teacher_logits = scratch;
  T* __restrict student_logits = scratch + k;
  T* __restrict teacher_exp = scratch + 2 * k;
  T* __restrict student_exp = scratch + 3 * k;
  T* __restrict scores = scratch + 4 * k;
  constexpr T kMinusInf = -std::numeric_limits<T>::infinity();
  const int64_t padded_n = padded_length(n);
  T kl_sum = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = row0 + r;
    int64_t* row_neighbours = neighbours + r * k;
    T* row_weights = weights + r * k;
    std::fill(row_neighbours, row_neighbours + k, int64_t{-1});
    std::fill(row_weights, row_weights + k, T(0));
    if (valid != nullptr && !valid[i]) continue;

    // J_i: k rounds of (max, its first index) over the ranking scores <T_i, T_j> / |T_j| of the remaining
    // candidates (-inf: self, invalid or taken); vector passes, no data-dependent branches.
    const T* __restrict gram_row = teacher_gram + r * ld;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) scores[j] = gram_row[j] * t_inv[j];
    std::fill(scores + n, scores + padded_n, kMinusInf);
    if (valid != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) scores[j] = valid[j] ? scores[j] : kMinusInf;
    }
    scores[i] = kMinusInf;
    bool complete = true;
    for (int64_t l = 0; l < k; ++l) {
      const T best = max_of(scores, padded_n);
      if (!(best > kMinusInf)) {
        complete = false;
        break;
      }
      int64_t first = n;
#pragma omp simd reduction(min : first)
      for (int64_t j = 0; j < n; ++j) first = scores[j] == best ? std::min(first, j) : first;
      row_neighbours[l] = first;
      teacher_logits[l] = best;
      scores[first] = kMinusInf;
    }
    if (!complete) {  // fewer than k valid candidates: no distribution over k neighbours
      std::fill(row_neighbours, row_neighbours + k, int64_t{-1});
      kl_sum += std::numeric_limits<T>::quiet_NaN();
      continue;
    }

    // Logits of both distributions over J_i (the student's from k dot products), then the softmaxes from one
    // exponential per entry, KL and the weights q - p.
    const T teacher_scale = t_inv[i] / problem.tau_t;
    const T student_scale = s_inv[i] / problem.tau_s;
    const T* s_i = student + i * d;
    int64_t l = 0;
    for (; l + 4 <= k; l += 4) dot4(s_i, student, row_neighbours + l, d, student_logits + l);
    for (; l < k; ++l) student_logits[l] = dot(s_i, student + row_neighbours[l] * d, d);
    T teacher_max = kMinusInf, student_max = kMinusInf;
    for (l = 0; l < k; ++l) {
      teacher_logits[l] *= teacher_scale;
      student_logits[l] *= s_inv[row_neighbours[l]] * student_scale;
      teacher_max = std::max(teacher_max, teacher_logits[l]);
      student_max = std::max(student_max, student_logits[l]);
    }
    T teacher_sum = 0, student_sum = 0;
    for (l = 0; l < k; ++l) {
      teacher_exp[l] = std::exp(teacher_logits[l] - teacher_max);
      student_exp[l] = std::exp(student_logits[l] - student_max);
      teacher_sum += teacher_exp[l];
      student_sum += student_exp[l];
    }
    const T teacher_lse = teacher_max + std::log(teacher_sum), student_lse = student_max + std::log(student_sum);
    T kl = 0;
    for (l = 0; l < k; ++l) {
      const T p = teacher_exp[l] / teacher_sum, q = student_exp[l] / student_sum;
      kl += p * ((teacher_logits[l] - teacher_lse) - (student_logits[l] - student_lse));
      row_weights[l] = q - p;
    }
    kl_sum += kl;
  }
  return kl_sum;
}

// The rows of one problem that reach row i of G = dL/du, as a list per row: (source row, coefficient) pairs,
// its own chosen pairs (i, j) with c_ij s_inv_j and the pairs (j, i) that chose it with c_ji s_inv_j.
template <typename T>
struct PairLists {
  std::vector<int64_t> offsets;  // (n + 1): row i's pairs are [offsets[i], offsets[i + 1])
  std::vector<int64_t> sources;
  std::vector<T> coefficients;
};

template <typename T>
PairLists<T> pair_lists(const NeighborhoodProblem<T>& problem, const int64_t* neighbours, const T* weights,
                        T scale) {
  const int64_t n = problem.n, k = problem.k;
  const T* s_inv = problem.student_inverse_norms;
  PairLists<T> lists;
  lists.offsets.assign(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t l = 0; l < k; ++l) {
      const int64_t j = neighbours[i * k + l];
      if (j < 0) continue;
      ++lists.offsets[i + 1];
      ++lists.offsets[j + 1];
    }
  }
  for (int64_t i = 0; i < n; ++i) lists.offsets[i + 1] += lists.offsets[i];
  lists.sources.resize(lists.offsets[n]);
  lists.coefficients.resize(lists.offsets[n]);
  std::vector<int64_t> fill(lists.offsets.begin(), lists.offsets.end() - 1);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t l = 0; l < k; ++l) {
      const int64_t j = neighbours[i * k + l];
      if (j < 0) continue;
      const T c = scale * weights[i * k + l];
      lists.sources[fill[i]] = j;
      lists.coefficients[fill[i]++] = c * s_inv[j];
      lists.sources[fill[j]] = i;
      lists.coefficients[fill[j]++] = c * s_inv[i];
    }
  }
  return lists;
}

// Per row i: G_i = sum of its pairs' coefficient * S_source into the row buffer g (four source rows per pass, so
// g is loaded and stored once per four), then dL/dS_i = (G_i - u_i <u_i, G_i>) / |S_i| written once.
template <typename T>
S2DC_TARGET_CLONES void backward_rows(const NeighborhoodProblem<T>& problem, const int64_t* __restrict offsets,
                                      const int64_t* __restrict sources, const T* __restrict coefficients,
                                      T* __restrict g, T* __restrict grad) {
  const int64_t n = problem.n, d = problem.d;
  const T* __restrict student = problem.student;
  const T* __restrict s_inv = problem.student_inverse_norms;
  for (int64_t i = 0; i < n; ++i) {
    std::fill(g, g + d, T(0));
    int64_t p = offsets[i];
    for (; p + 4 <= offsets[i + 1]; p += 4) {
      const T* __restrict b0 = student + sources[p] * d;
      const T* __restrict b1 = student + sources[p + 1] * d;
      const T* __restrict b2 = student + sources[p + 2] * d;
      const T* __restrict b3 = student + sources[p + 3] * d;
      const T c0 = coefficients[p], c1 = coefficients[p + 1], c2 = coefficients[p + 2], c3 = coefficients[p + 3];
#pragma omp simd
      for (int64_t l = 0; l < d; ++l) g[l] += c0 * b0[l] + c1 * b1[l] + c2 * b2[l] + c3 * b3[l];
    }
    for (; p < offsets[i + 1]; ++p) axpy(coefficients[p], student + sources[p] * d, g, d);
    // Through u = S / max(|S|, eps): (G - u <u, G>) / |S|, or G / eps where the norm is clamped.
    const T inv = s_inv[i];
    const T* s = student + i * d;
    const T radial = inv * kNormEps < 1 ? inv * inv * inv * dot(s, g, d) : T(0);
    T* out = grad + i * d;
#pragma omp simd
    for (int64_t l = 0; l < d; ++l) out[l] = inv * g[l] - radial * s[l];
  }
}

}  // namespace

template <typename T>
void inverse_row_norms(const T* x, int64_t rows, int64_t d, T* inverse_norms) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = x + r * d;
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t l = 0; l < d; ++l) sum += row[l] * row[l];
    inverse_norms[r] = T(1) / std::max(std::sqrt(sum), T(kNormEps));
  }
}

template <typename T>
T neighborhood_forward_rows(const NeighborhoodProblem<T>& problem, const T* teacher_gram, int64_t ld, int64_t row0,
                            int64_t rows, int64_t* neighbours, T* weights) {
  std::vector<T> scratch(4 * problem.k + padded_length(problem.n));
  return forward_rows(problem, teacher_gram, ld, row0, rows, neighbours, weights, scratch.data());
}

template <typename T>
void neighborhood_backward(const NeighborhoodProblem<T>& problem, const int64_t* neighbours, const T* weights,
                           T scale, T* grad_student) {
  const PairLists<T> lists = pair_lists(problem, neighbours, weights, scale);
  std::vector<T> row_buffer(problem.d);
  backward_rows(problem, lists.offsets.data(), lists.sources.data(), lists.coefficients.data(), row_buffer.data(),
                grad_student);
}

template void inverse_row_norms<float>(const float*, int64_t, int64_t, float*);
template void inverse_row_norms<double>(const double*, int64_t, int64_t, double*);
template float neighborhood_forward_rows<float>(const NeighborhoodProblem<float>&, const float*, int64_t, int64_t,
                                                int64_t, int64_t*, float*);
template double neighborhood_forward_rows<double>(const NeighborhoodProblem<double>&, const double*, int64_t,
                                                  int64_t, int64_t, int64_t*, double*);
template void neighborhood_backward<float>(const NeighborhoodProblem<float>&, const int64_t*, const float*, float,
                                           float*);
template void neighborhood_backward<double>(const NeighborhoodProblem<double>&, const int64_t*, const double*,
                                            double, double*);

}  // namespace s2dc::cpu

// Fused neighbourhood-consistency loss L_nc of S2DC on the CPU (docs/method.md, section 4): for each valid patch
// i of a problem, J_i = the k valid teacher patches j != i of largest cos(T_i, T_j),
//   p_i = softmax_{J_i} cos(T_i, T_j) / tau_t,   q_i = softmax_{J_i} cos(S_i, S_j) / tau_s,   KL(p_i || q_i),
// and its gradient in the student rows S. Torch-free (raw pointers), so the C++ unit tests link it without
// libtorch; the binding (neighborhood_binding.cpp) computes the teacher Gram tiles with BLAS and runs problems and
// row blocks in parallel.
#pragma once

#include <cstdint>

namespace s2dc::cpu {

// inverse_norms[r] = 1 / max(|x_r|, 1e-12) for the rows of x (rows, d), row-major (the norm clamp of F.normalize).
template <typename T>
void inverse_row_norms(const T* x, int64_t rows, int64_t d, T* inverse_norms);

// One problem: n patches of dimension d, k neighbours per patch, temperatures tau_s, tau_t > 0.
template <typename T>
struct NeighborhoodProblem {
  const T* student;                // S (n, d), row-major
  const T* student_inverse_norms;  // (n), inverse_row_norms of S
  const T* teacher_inverse_norms;  // (n), inverse_row_norms of T
  const bool* valid;               // (n), true = valid patch; null: all valid
  int64_t n, d, k;
  T tau_s, tau_t;
};

// Forward of rows [row0, row0 + rows) of a problem. teacher_gram holds the inner products <T_i, T_j>: row
// i = row0 + r at teacher_gram[r * ld + j], j < n. For each valid row i writes the neighbours J_i best first
// (neighbours[r * k + l], indices into the problem's rows) and the weights q_i(j) - p_i(j) of the same slots
// (weights[r * k + l], the derivative of KL(p_i || q_i) in the student logit cos(S_i, S_j) / tau_s); an invalid
// row gets neighbours -1 and weights 0. Returns the sum of KL(p_i || q_i) over the valid rows. Each valid row
// needs at least k valid candidates j != i: a row with fewer gets neighbours -1, weights 0 and a NaN KL (so the
// sum is NaN). Ties of teacher similarity keep the smaller index. Cost per row: 2 k vector passes over n scores,
// k dot products of length d, 2 k exponentials.
template <typename T>
T neighborhood_forward_rows(const NeighborhoodProblem<T>& problem, const T* teacher_gram, int64_t ld, int64_t row0,
                            int64_t rows, int64_t* neighbours, T* weights);

// Backward of one problem: grad_student (n, d) = d/dS of scale * sum_{i, l} weights[i k + l] cos(S_i, S_{J_il}),
// i.e. the student gradient of the loss when scale = dL/d(sum of KL) / tau_s. Both ends of every chosen pair
// receive gradient (row i through cos(S_i, .), row J_il through cos(., S_J)), then the Jacobian of S -> S / max(|S|,
// 1e-12) maps it to S. Slots with index -1 are skipped. grad_student is overwritten. Scratch: 2 n k pairs and
// one row.
template <typename T>
void neighborhood_backward(const NeighborhoodProblem<T>& problem, const int64_t* neighbours, const T* weights,
                           T scale, T* grad_student);

}  // namespace s2dc::cpu

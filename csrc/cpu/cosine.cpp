// Scaling and projection passes of the fused cosine similarity (see cosine.h for the math and the contract).
// Both are memory-bound single passes: the scaling reads and writes the (rows, cols) matrix once with the scale
// vectors in cache; the projection reads a row of x and of the gradient (two dot products in one loop), then
// updates the gradient row while both are in L1.
#include "cosine.h"

#include <cmath>

#include "target_clones.h"  // the row loops are compiled per instruction set

namespace s2dc::cpu {
namespace {

constexpr double kNormEps = 1e-12;  // F.normalize's clamp of the norm

}  // namespace

template <typename T>
S2DC_TARGET_CLONES void scale_rows_and_columns(const T* in, int64_t row_stride, int64_t col_stride, int64_t rows,
                                               int64_t cols, const T* __restrict row_scale, T factor,
                                               const T* __restrict col_scale, T* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const T scale = row_scale[r] * factor;
    const T* in_row = in + r * row_stride;
    T* out_row = out + r * cols;
    if (col_stride == 1) {
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) out_row[c] = in_row[c] * scale * col_scale[c];
    } else {
      for (int64_t c = 0; c < cols; ++c) out_row[c] = in_row[c * col_stride] * scale * col_scale[c];
    }
  }
}

template <typename T>
S2DC_TARGET_CLONES void project_out_rows(const T* __restrict x, int64_t rows, int64_t d, T* __restrict grad) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* x_row = x + r * d;
    T* grad_row = grad + r * d;
    T squared_norm = 0, grad_dot_x = 0;
#pragma omp simd reduction(+ : squared_norm, grad_dot_x)
    for (int64_t l = 0; l < d; ++l) {
      squared_norm += x_row[l] * x_row[l];
      grad_dot_x += grad_row[l] * x_row[l];
    }
    if (!(std::sqrt(squared_norm) >= T(kNormEps))) continue;  // clamped norm: a_r is constant
    const T coefficient = grad_dot_x / squared_norm;
#pragma omp simd
    for (int64_t l = 0; l < d; ++l) grad_row[l] -= coefficient * x_row[l];
  }
}

template void scale_rows_and_columns<float>(const float*, int64_t, int64_t, int64_t, int64_t, const float*, float,
                                            const float*, float*);
template void scale_rows_and_columns<double>(const double*, int64_t, int64_t, int64_t, int64_t, const double*,
                                             double, const double*, double*);
template void project_out_rows<float>(const float*, int64_t, int64_t, float*);
template void project_out_rows<double>(const double*, int64_t, int64_t, double*);

}  // namespace s2dc::cpu

// Fused temperature-scaled cosine similarity on the CPU, S_ij = a_i <x_i, y_j> b_j / t with the inverse norms
// a_i = 1 / max(|x_i|, 1e-12), b_j = 1 / max(|y_j|, 1e-12) (F.normalize's clamp), and its gradient. The raw
// products x y^T and the backward's matrix products are BLAS GEMMs in the binding (cosine_binding.cpp); these
// torch-free passes scale their operands and outputs, so no normalised copy of x or y is ever made. The inverse
// norms come from inverse_row_norms (neighborhood.h).
//
// Backward of a loss L(S), with G = dL/dS and H_ij = a_i G_ij b_j / t (the one scaled copy of G):
//   dL/dx_i = r_i - <r_i, x_i> x_i / |x_i|^2     with r = H y,
//   dL/dy_j = r'_j - <r'_j, y_j> y_j / |y_j|^2   with r' = H^T x,
// since S_ij = a_i b_j P_ij / t with P = x y^T, dL/dP = H, and da_i/dx_i = -a_i^3 x_i: the second term is the
// normalisation's Jacobian, dL/da_i da_i/dx_i = -(<r_i, x_i> / a_i) a_i^3 x_i. A row whose norm is clamped
// (|x_i| < 1e-12) has a constant a_i = 1e12 and keeps r_i (as autograd through F.normalize gives).
#pragma once

#include <cstdint>

namespace s2dc::cpu {

// out[r * cols + c] = in[r * row_stride + c * col_stride] * (row_scale[r] * factor) * col_scale[c] for r < rows,
// c < cols: the forward's scaling of the raw products in place (in == out, row_stride = cols, col_stride = 1) and
// the backward's scaled copy H of G (any strides, 0 included: expanded gradients are read as they are).
template <typename T>
void scale_rows_and_columns(const T* in, int64_t row_stride, int64_t col_stride, int64_t rows, int64_t cols,
                            const T* row_scale, T factor, const T* col_scale, T* out);

// grad_r -= <grad_r, x_r> x_r / |x_r|^2 for the rows r < rows of x and grad (rows, d), row-major, whose norm is
// at least 1e-12 (the projection that turns dL/du_r = grad_r / a_r into dL/dx_r, see above); clamped rows are
// left as they are. One pass over both, reading x_r and grad_r twice each from L1.
template <typename T>
void project_out_rows(const T* x, int64_t rows, int64_t d, T* grad);

}  // namespace s2dc::cpu

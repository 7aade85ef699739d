// CPU implementations of s2dc_C::cosine_forward / cosine_backward (schemas in csrc/ops.cpp): the fused cosine
// similarity around the torch-free passes of cosine.cpp (math in cosine.h).
//
// Forward: the inverse row norms a (B, N), b (B, M) (one pass over x and y), the raw products x y^T by one BLAS
// batched GEMM (at::bmm, multi-threaded) straight into the output, then one pass scaling row i by a_i / t and
// column j by b_j in place. Memory: the output and the norms; no normalised copy of x or y.
// Backward: H = a G b / t (the one scaled copy of G, read with G's strides), dx = H y and dy = H^T x by BLAS,
// then the normalisation's Jacobian projected out of each gradient row. Memory: H, the two gradients, the norms.
// The passes run over rows in parallel on torch's intra-op threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "cpu/cosine.h"
#include "cpu/pair_checks.h"
#include "cpu/neighborhood.h"  // inverse_row_norms

namespace s2dc {
namespace {

void check_pair(const at::Tensor& x, const at::Tensor& y, double temperature, const char* op) {
  check_cpu_pair(x, y, op);
  TORCH_CHECK(temperature > 0, op, ": temperature must be positive, got ", temperature);
}

// fn(b, row, rows) over the rows of B problems of `rows_per_problem` rows, in parallel chunks of about `grain`
// rows that never cross a problem.
template <typename Fn>
void for_row_chunks(int64_t B, int64_t rows_per_problem, int64_t grain, const Fn& fn) {
  at::parallel_for(0, B * rows_per_problem, std::max<int64_t>(grain, 1), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end;) {
      const int64_t b = row / rows_per_problem, stop = std::min(end, (b + 1) * rows_per_problem);
      fn(b, row - b * rows_per_problem, stop - row);
      row = stop;
    }
  });
}

// Rows of about this many elements make one parallel chunk.
constexpr int64_t kChunkElements = 1 << 15;

// 1 / max(|t_r|, 1e-12) of the rows of t (B, R, D), contiguous: (B, R).
template <typename T>
at::Tensor inverse_norms(const at::Tensor& t) {
  const int64_t B = t.size(0), R = t.size(1), D = t.size(2);
  at::Tensor out = at::empty({B, R}, t.options());
  const T* rows = t.const_data_ptr<T>();
  T* norms = out.mutable_data_ptr<T>();
  for_row_chunks(B, R, kChunkElements / std::max<int64_t>(D, 1), [&](int64_t b, int64_t row, int64_t count) {
    cpu::inverse_row_norms(rows + (b * R + row) * D, count, D, norms + b * R + row);
  });
  return out;
}

at::Tensor cosine_forward_cpu(const at::Tensor& x, const at::Tensor& y, double temperature) {
  check_pair(x, y, temperature, "cosine_forward (cpu)");
  const int64_t B = x.size(0), N = x.size(1), M = y.size(1);
  const at::Tensor x_rows = x.detach().contiguous();
  const at::Tensor y_rows = x.is_same(y) ? x_rows : y.detach().contiguous();
  at::Tensor out = at::bmm(x_rows, y_rows.transpose(1, 2));  // raw products (B, N, M), contiguous
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cosine_forward_cpu", [&] {
    const at::Tensor x_norms = inverse_norms<scalar_t>(x_rows);
    const at::Tensor y_norms = y_rows.is_same(x_rows) ? x_norms : inverse_norms<scalar_t>(y_rows);
    const scalar_t* a = x_norms.const_data_ptr<scalar_t>();
    const scalar_t* b_norms = y_norms.const_data_ptr<scalar_t>();
    scalar_t* s = out.mutable_data_ptr<scalar_t>();
    const auto factor = static_cast<scalar_t>(1.0 / temperature);
    for_row_chunks(B, N, kChunkElements / M, [&](int64_t b, int64_t row, int64_t count) {
      scalar_t* block = s + (b * N + row) * M;
      cpu::scale_rows_and_columns(block, M, 1, count, M, a + b * N + row, factor, b_norms + b * M, block);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> cosine_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                       const at::Tensor& y, double temperature) {
  constexpr const char* op = "cosine_backward (cpu)";
  check_pair(x, y, temperature, op);
  const int64_t B = x.size(0), N = x.size(1), M = y.size(1), D = x.size(2);
  TORCH_CHECK(grad.device().is_cpu() && grad.scalar_type() == x.scalar_type(), op,
              ": grad must be a CPU tensor of x's dtype, got ", grad.device(), " ", grad.scalar_type());
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == B && grad.size(1) == N && grad.size(2) == M, op,
              ": grad must be (B, N, M) = (", B, ", ", N, ", ", M, "), got ", grad.sizes());
  const at::Tensor x_rows = x.detach().contiguous();
  const at::Tensor y_rows = x.is_same(y) ? x_rows : y.detach().contiguous();
  at::Tensor scaled = at::empty({B, N, M}, x.options());  // H = a G b / t
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cosine_backward_cpu", [&] {
    if (scaled.numel() == 0) return;
    const at::Tensor x_norms = inverse_norms<scalar_t>(x_rows);
    const at::Tensor y_norms = y_rows.is_same(x_rows) ? x_norms : inverse_norms<scalar_t>(y_rows);
    const at::Tensor g = grad.detach();
    const scalar_t* g_data = g.const_data_ptr<scalar_t>();
    const scalar_t* a = x_norms.const_data_ptr<scalar_t>();
    const scalar_t* b_norms = y_norms.const_data_ptr<scalar_t>();
    scalar_t* h = scaled.mutable_data_ptr<scalar_t>();
    const auto factor = static_cast<scalar_t>(1.0 / temperature);
    for_row_chunks(B, N, kChunkElements / M, [&](int64_t b, int64_t row, int64_t count) {
      cpu::scale_rows_and_columns(g_data + b * g.stride(0) + row * g.stride(1), g.stride(1), g.stride(2), count, M,
                                  a + b * N + row, factor, b_norms + b * M, h + (b * N + row) * M);
    });
  });
  at::Tensor grad_x = at::bmm(scaled, y_rows);                  // r = H y (B, N, D)
  at::Tensor grad_y = at::bmm(scaled.transpose(1, 2), x_rows);  // r' = H^T x (B, M, D)
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cosine_backward_cpu", [&] {
    const int64_t grain = kChunkElements / std::max<int64_t>(D, 1);
    auto project = [&](const at::Tensor& rows, at::Tensor& gradient) {
      const int64_t R = rows.size(1);
      const scalar_t* rows_data = rows.const_data_ptr<scalar_t>();
      scalar_t* gradient_data = gradient.mutable_data_ptr<scalar_t>();
      for_row_chunks(B, R, grain, [&](int64_t b, int64_t row, int64_t count) {
        cpu::project_out_rows(rows_data + (b * R + row) * D, count, D, gradient_data + (b * R + row) * D);
      });
    };
    project(x_rows, grad_x);
    project(y_rows, grad_y);
  });
  return {grad_x, grad_y};
}

}  // namespace
}  // namespace s2dc

TORCH_LIBRARY_IMPL(s2dc_C, CPU, m) {
  m.impl("cosine_forward", &s2dc::cosine_forward_cpu);
  m.impl("cosine_backward", &s2dc::cosine_backward_cpu);
}

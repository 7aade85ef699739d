// Input checks shared by the CPU bindings of the ops on pairs of row sets (knn, cosine similarity).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace s2dc {

// x (B, N, D) and y (B, M, D): CPU tensors, float32 or float64, one dtype. `op` names the op in the errors.
inline void check_cpu_pair(const at::Tensor& x, const at::Tensor& y, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), op, ": x and y must be CPU tensors, got ", x.device(),
              " and ", y.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), op, ": y must have x's dtype ", x.scalar_type(), ", got ",
              y.scalar_type());
  TORCH_CHECK(x.dim() == 3 && y.dim() == 3 && y.size(0) == x.size(0) && y.size(2) == x.size(2), op,
              ": x must be (B, N, D) and y (B, M, D), got ", x.sizes(), " and ", y.sizes());
}

}  // namespace s2dc

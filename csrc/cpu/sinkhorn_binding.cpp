// CPU implementations of s2dc_C::sinkhorn_forward / sinkhorn_backward / sinkhorn_knopp (schemas in csrc/ops.cpp):
// argument checks, outputs, dtype dispatch, and the loops over the batch or the half-steps around the torch-free
// kernels of sinkhorn.cpp.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "cpu/sinkhorn.h"
#include "sinkhorn_checks.h"

namespace s2dc {
namespace {

// body(b) for every problem b of the batch, spread over torch's intra-op threads (one problem per thread at a
// time: a problem's passes are too short to split over threads, each would cost a barrier).
template <typename Body>
void for_each_problem(int64_t batch, const Body& body) {
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) body(b);
  });
}

template <typename T>
cpu::SinkhornProblem<T> problem_at(const at::Tensor& C, const at::Tensor& log_a, const at::Tensor& log_b,
                                   double eps, int64_t b) {
  const int64_t N = C.size(1), M = C.size(2);
  return {C.const_data_ptr<T>() + b * N * M, log_a.const_data_ptr<T>() + b * N, log_b.const_data_ptr<T>() + b * M,
          N, M, static_cast<T>(eps)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_forward_cpu(
    const at::Tensor& C, const at::Tensor& log_a, const at::Tensor& log_b, double eps, int64_t n_iters,
    double tol) {
  constexpr const char* op = "sinkhorn_forward (cpu)";
  at::Tensor f, g, f_hist, g_hist, n_done;  // named tensors, not structured bindings: lambdas capture them
  std::tie(f, g, f_hist, g_hist, n_done) = prepare_forward(C, log_a, log_b, eps, n_iters, c10::DeviceType::CPU, op);
  const int64_t B = C.size(0), N = C.size(1), M = C.size(2);
  AT_DISPATCH_FLOATING_TYPES(C.scalar_type(), "sinkhorn_forward_cpu", [&] {
    scalar_t* f_out = f.mutable_data_ptr<scalar_t>();
    scalar_t* g_out = g.mutable_data_ptr<scalar_t>();
    scalar_t* f_hist_out = f_hist.mutable_data_ptr<scalar_t>();
    scalar_t* g_hist_out = g_hist.mutable_data_ptr<scalar_t>();
    int64_t* n_done_out = n_done.mutable_data_ptr<int64_t>();
    for_each_problem(B, [&](int64_t b) {
      n_done_out[b] = cpu::sinkhorn_forward(problem_at<scalar_t>(C, log_a, log_b, eps, b), n_iters,
                                            static_cast<scalar_t>(tol), f_out + b * N, g_out + b * M,
                                            f_hist_out + b * n_iters * N, g_hist_out + b * n_iters * M);
    });
  });
  return {f, g, f_hist, g_hist, n_done};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_backward_cpu(
    const at::Tensor& C, const at::Tensor& log_a, const at::Tensor& log_b, double eps, const at::Tensor& f_hist,
    const at::Tensor& g_hist, const at::Tensor& n_done, const at::Tensor& grad_f_in, const at::Tensor& grad_g_in) {
  constexpr const char* op = "sinkhorn_backward (cpu)";
  at::Tensor grad_f, grad_g;
  std::tie(grad_f, grad_g) = prepare_backward(C, log_a, log_b, eps, f_hist, g_hist, n_done, grad_f_in, grad_g_in,
                                              c10::DeviceType::CPU, op);
  const int64_t B = C.size(0), N = C.size(1), M = C.size(2), n_iters = f_hist.size(1);
  const int64_t* done = n_done.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(done[b] >= 0 && done[b] <= n_iters, op, ": n_done[", b, "] = ", done[b],
                " is outside [0, n_iters = ", n_iters, "]");
  }
  at::Tensor grad_C = at::empty_like(C);
  at::Tensor grad_log_a = at::empty_like(log_a);
  at::Tensor grad_log_b = at::empty_like(log_b);
  AT_DISPATCH_FLOATING_TYPES(C.scalar_type(), "sinkhorn_backward_cpu", [&] {
    const scalar_t* f_hist_in = f_hist.const_data_ptr<scalar_t>();
    const scalar_t* g_hist_in = g_hist.const_data_ptr<scalar_t>();
    const scalar_t* grad_f_ptr = grad_f.const_data_ptr<scalar_t>();
    const scalar_t* grad_g_ptr = grad_g.const_data_ptr<scalar_t>();
    scalar_t* grad_C_out = grad_C.mutable_data_ptr<scalar_t>();
    scalar_t* grad_log_a_out = grad_log_a.mutable_data_ptr<scalar_t>();
    scalar_t* grad_log_b_out = grad_log_b.mutable_data_ptr<scalar_t>();
    for_each_problem(B, [&](int64_t b) {
      cpu::sinkhorn_backward(problem_at<scalar_t>(C, log_a, log_b, eps, b), f_hist_in + b * n_iters * N,
                             g_hist_in + b * n_iters * M, done[b], grad_f_ptr + b * N, grad_g_ptr + b * M,
                             grad_C_out + b * N * M, grad_log_a_out + b * N, grad_log_b_out + b * M);
    });
  });
  return {grad_C, grad_log_a, grad_log_b};
}

// SwAV's Sinkhorn-Knopp on logits (B, K): p = 0, then n_iters times the column half-step (threads over chunks of
// columns) and the row half-step (threads over rows); the last row half-step writes each row of Q right after its
// potential, while the row is still in cache. Two scratch vectors, p (B) and q (K).
at::Tensor sinkhorn_knopp_cpu(const at::Tensor& logits, double eps, int64_t n_iters) {
  constexpr const char* op = "sinkhorn_knopp (cpu)";
  TORCH_CHECK(logits.device().is_cpu(), op, ": logits must be a CPU tensor, got one on ", logits.device());
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be (B, K), got shape ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble, op,
              ": logits must be float32 or float64, got ", logits.scalar_type());
  TORCH_CHECK(eps > 0 && std::isfinite(eps), op, ": eps must be finite and > 0, got ", eps);
  TORCH_CHECK(n_iters >= 1, op, ": n_iters must be >= 1, got ", n_iters);
  const at::Tensor L = logits.contiguous();
  at::Tensor Q = at::empty_like(L, at::MemoryFormat::Contiguous);
  const int64_t B = L.size(0), K = L.size(1);
  if (B == 0 || K == 0) return Q;
  // Rows per task: at least ~32K entries, so that short rows do not cost a task each.
  const int64_t row_grain = std::max<int64_t>(1, (int64_t{1} << 15) / K);
  AT_DISPATCH_FLOATING_TYPES(L.scalar_type(), "sinkhorn_knopp_cpu", [&] {
    const scalar_t* x = L.const_data_ptr<scalar_t>();
    scalar_t* out = Q.mutable_data_ptr<scalar_t>();
    const auto scale = static_cast<scalar_t>(1.442695040888963407359924681001892137 / eps);  // log2(e) / eps
    constexpr int64_t chunk = cpu::kKnoppColumnChunk<scalar_t>;
    std::vector<scalar_t> p(B, scalar_t(0)), q(K);
    for (int64_t t = 1; t <= n_iters; ++t) {
      at::parallel_for(0, (K + chunk - 1) / chunk, 1, [&](int64_t begin, int64_t end) {
        cpu::knopp_column_update(x, B, K, scale, p.data(), q.data(), begin * chunk, std::min(K, end * chunk));
      });
      const bool last = t == n_iters;
      at::parallel_for(0, B, row_grain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          cpu::knopp_row_update(x, B, K, scale, q.data(), p.data(), i, i + 1);
          if (last) cpu::knopp_plan(x, B, K, scale, p.data(), q.data(), out, i, i + 1);
        }
      });
    }
  });
  return Q;
}

}  // namespace
}  // namespace s2dc

TORCH_LIBRARY_IMPL(s2dc_C, CPU, m) {
  m.impl("sinkhorn_forward", &s2dc::sinkhorn_forward_cpu);
  m.impl("sinkhorn_backward", &s2dc::sinkhorn_backward_cpu);
  m.impl("sinkhorn_knopp", &s2dc::sinkhorn_knopp_cpu);
}

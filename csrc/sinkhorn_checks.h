// Argument checks and outputs of the s2dc_C::sinkhorn_forward / sinkhorn_backward schemas, shared by the bindings
// of every device; `op` names the operator and backend in the messages, e.g. "sinkhorn_forward (cpu)".
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <tuple>
#include <utility>

namespace s2dc {

// t is on C's device, has C's dtype and is contiguous.
inline void check_like_cost(const at::Tensor& t, const char* name, const at::Tensor& C, const char* op) {
  TORCH_CHECK(t.device() == C.device(), op, ": ", name, " is on ", t.device(), " but C is on ", C.device());
  TORCH_CHECK(t.scalar_type() == C.scalar_type(), op, ": ", name, " must have C's dtype ", C.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// C (B, N, M) float32 or float64 on a `device` device, log_a (B, N) and log_b (B, M) like it; eps > 0.
inline void check_problem(const at::Tensor& C, const at::Tensor& log_a, const at::Tensor& log_b, double eps,
                          c10::DeviceType device, const char* op) {
  TORCH_CHECK(C.device().type() == device, op, ": C must be a ", device, " tensor, got one on ", C.device());
  TORCH_CHECK(C.scalar_type() == at::kFloat || C.scalar_type() == at::kDouble, op,
              ": C must be float32 or float64, got ", C.scalar_type());
  TORCH_CHECK(C.dim() == 3, op, ": C must be (B, N, M), got shape ", C.sizes());
  TORCH_CHECK(C.is_contiguous(), op, ": C must be contiguous");
  check_like_cost(log_a, "log_a", C, op);
  check_like_cost(log_b, "log_b", C, op);
  TORCH_CHECK(log_a.dim() == 2 && log_a.size(0) == C.size(0) && log_a.size(1) == C.size(1), op,
              ": log_a must be (B, N) = (", C.size(0), ", ", C.size(1), "), got ", log_a.sizes());
  TORCH_CHECK(log_b.dim() == 2 && log_b.size(0) == C.size(0) && log_b.size(1) == C.size(2), op,
              ": log_b must be (B, M) = (", C.size(0), ", ", C.size(2), "), got ", log_b.sizes());
  TORCH_CHECK(eps > 0, op, ": eps must be > 0, got ", eps);
}

// The saved iterates f_hist (B, n_iters, N), g_hist (B, n_iters, M), n_done int64 (B,) on C's device, and the
// adjoints grad_f (B, N), grad_g (B, M), all but n_done of C's dtype and contiguous.
inline void check_backward_operands(const at::Tensor& C, const at::Tensor& f_hist, const at::Tensor& g_hist,
                                    const at::Tensor& n_done, const at::Tensor& grad_f, const at::Tensor& grad_g,
                                    const char* op) {
  const int64_t B = C.size(0), N = C.size(1), M = C.size(2);
  check_like_cost(f_hist, "f_hist", C, op);
  check_like_cost(g_hist, "g_hist", C, op);
  check_like_cost(grad_f, "grad_f", C, op);
  check_like_cost(grad_g, "grad_g", C, op);
  TORCH_CHECK(f_hist.dim() == 3 && f_hist.size(0) == B && f_hist.size(2) == N, op,
              ": f_hist must be (B, n_iters, N) with (B, N) = (", B, ", ", N, "), got ", f_hist.sizes());
  TORCH_CHECK(g_hist.dim() == 3 && g_hist.size(0) == B && g_hist.size(1) == f_hist.size(1) && g_hist.size(2) == M,
              op, ": g_hist must be (B, n_iters, M) = (", B, ", ", f_hist.size(1), ", ", M, "), got ",
              g_hist.sizes());
  TORCH_CHECK(grad_f.dim() == 2 && grad_f.size(0) == B && grad_f.size(1) == N, op, ": grad_f must be (B, N) = (",
              B, ", ", N, "), got ", grad_f.sizes());
  TORCH_CHECK(grad_g.dim() == 2 && grad_g.size(0) == B && grad_g.size(1) == M, op, ": grad_g must be (B, M) = (",
              B, ", ", M, "), got ", grad_g.sizes());
  TORCH_CHECK(n_done.device() == C.device(), op, ": n_done is on ", n_done.device(), " but C is on ", C.device());
  TORCH_CHECK(n_done.scalar_type() == at::kLong && n_done.dim() == 1 && n_done.size(0) == B, op,
              ": n_done must be int64 of shape (B,) = (", B, ",), got ", n_done.scalar_type(), " ", n_done.sizes());
  TORCH_CHECK(n_done.is_contiguous(), op, ": n_done must be contiguous");
}

using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Checks the forward's arguments; returns its uninitialised outputs (f, g, f_hist, g_hist, n_done).
inline ForwardOutputs prepare_forward(const at::Tensor& C, const at::Tensor& log_a, const at::Tensor& log_b,
                                      double eps, int64_t n_iters, c10::DeviceType device, const char* op) {
  check_problem(C, log_a, log_b, eps, device, op);
  TORCH_CHECK(n_iters >= 1, op, ": n_iters must be >= 1, got ", n_iters);
  const int64_t B = C.size(0), N = C.size(1), M = C.size(2);
  return {at::empty({B, N}, C.options()), at::empty({B, M}, C.options()), at::empty({B, n_iters, N}, C.options()),
          at::empty({B, n_iters, M}, C.options()), at::empty({B}, C.options().dtype(at::kLong))};
}

// Checks the backward's arguments; returns the incoming gradients made contiguous (they come from autograd,
// whose layout, e.g. expanded zeros, the caller does not control).
inline std::pair<at::Tensor, at::Tensor> prepare_backward(const at::Tensor& C, const at::Tensor& log_a,
                                                          const at::Tensor& log_b, double eps,
                                                          const at::Tensor& f_hist, const at::Tensor& g_hist,
                                                          const at::Tensor& n_done, const at::Tensor& grad_f,
                                                          const at::Tensor& grad_g, c10::DeviceType device,
                                                          const char* op) {
  check_problem(C, log_a, log_b, eps, device, op);
  std::pair<at::Tensor, at::Tensor> grads{grad_f.contiguous(), grad_g.contiguous()};
  check_backward_operands(C, f_hist, g_hist, n_done, grads.first, grads.second, op);
  return grads;
}

}  // namespace s2dc

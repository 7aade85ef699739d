// CUDA implementations of s2dc_C::sinkhorn_forward / sinkhorn_backward (schemas in csrc/ops.cpp): argument
// checks, outputs, dtype dispatch, then the torch-free launchers of sinkhorn.cu on the current stream (one launch
// per call, the whole batch in its grid). Compiled only in CUDA builds.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/sinkhorn.h"
#include "sinkhorn_checks.h"

namespace s2dc {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err),
              err == cudaErrorInvalidValue ? " (B, N, M and n_iters must each be below 2^31)" : "");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_forward_cuda_op(
    const at::Tensor& C, const at::Tensor& log_a, const at::Tensor& log_b, double eps, int64_t n_iters,
    double tol) {
  constexpr const char* op = "sinkhorn_forward (cuda)";
  const c10::cuda::CUDAGuard device_guard(C.device());
  at::Tensor f, g, f_hist, g_hist, n_done;  // named tensors, not structured bindings: lambdas capture them
  std::tie(f, g, f_hist, g_hist, n_done) = prepare_forward(C, log_a, log_b, eps, n_iters, c10::DeviceType::CUDA, op);
  const int64_t B = C.size(0), N = C.size(1), M = C.size(2);
  if (B == 0) return {f, g, f_hist, g_hist, n_done};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES(C.scalar_type(), "sinkhorn_forward_cuda", [&] {
    err = sinkhorn_forward_cuda<scalar_t>(
        C.const_data_ptr<scalar_t>(), log_a.const_data_ptr<scalar_t>(), log_b.const_data_ptr<scalar_t>(), B, N,
        M, static_cast<scalar_t>(eps), n_iters, static_cast<scalar_t>(tol), f.mutable_data_ptr<scalar_t>(),
        g.mutable_data_ptr<scalar_t>(), f_hist.mutable_data_ptr<scalar_t>(),
        g_hist.mutable_data_ptr<scalar_t>(), n_done.mutable_data_ptr<int64_t>(), stream);
  });
  check_launch(err, op);
  return {f, g, f_hist, g_hist, n_done};
}

// n_done stays on the device (checking it here would synchronise); the kernel clamps it to [0, n_iters].
std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_backward_cuda_op(
    const at::Tensor& C, const at::Tensor& log_a, const at::Tensor& log_b, double eps, const at::Tensor& f_hist,
    const at::Tensor& g_hist, const at::Tensor& n_done, const at::Tensor& grad_f_in, const at::Tensor& grad_g_in) {
  constexpr const char* op = "sinkhorn_backward (cuda)";
  const c10::cuda::CUDAGuard device_guard(C.device());
  at::Tensor grad_f, grad_g;
  std::tie(grad_f, grad_g) = prepare_backward(C, log_a, log_b, eps, f_hist, g_hist, n_done, grad_f_in, grad_g_in,
                                              c10::DeviceType::CUDA, op);
  const int64_t B = C.size(0), N = C.size(1), M = C.size(2), n_iters = f_hist.size(1);
  at::Tensor grad_C = at::empty_like(C);
  at::Tensor grad_log_a = at::empty_like(log_a);
  at::Tensor grad_log_b = at::empty_like(log_b);
  if (B == 0) return {grad_C, grad_log_a, grad_log_b};
  // Holds the adjoints only when they do not fit in shared memory; small next to grad_C.
  at::Tensor workspace = at::empty({sinkhorn_backward_workspace_numel(B, N, M)}, C.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES(C.scalar_type(), "sinkhorn_backward_cuda", [&] {
    err = sinkhorn_backward_cuda<scalar_t>(
        C.const_data_ptr<scalar_t>(), log_a.const_data_ptr<scalar_t>(), log_b.const_data_ptr<scalar_t>(),
        f_hist.const_data_ptr<scalar_t>(), g_hist.const_data_ptr<scalar_t>(), n_done.const_data_ptr<int64_t>(),
        grad_f.const_data_ptr<scalar_t>(), grad_g.const_data_ptr<scalar_t>(), B, N, M,
        static_cast<scalar_t>(eps), n_iters, grad_C.mutable_data_ptr<scalar_t>(),
        grad_log_a.mutable_data_ptr<scalar_t>(), grad_log_b.mutable_data_ptr<scalar_t>(),
        workspace.mutable_data_ptr<scalar_t>(), stream);
  });
  check_launch(err, op);
  return {grad_C, grad_log_a, grad_log_b};
}

}  // namespace
}  // namespace s2dc

TORCH_LIBRARY_IMPL(s2dc_C, CUDA, m) {
  m.impl("sinkhorn_forward", &s2dc::sinkhorn_forward_cuda_op);
  m.impl("sinkhorn_backward", &s2dc::sinkhorn_backward_cuda_op);
}

// The operator library s2dc_C (schemas; the CPU and CUDA bindings register the implementations) and the Python
// module s2dc_kernels._C: importing it loads the library, which registers torch.ops.s2dc_C.*.
#include <Python.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

TORCH_LIBRARY(s2dc_C, m) {
  // (f, g, f_hist, g_hist, n_done): final potentials (B, N), (B, M), iterates (B, n_iters, N), (B, n_iters, M),
  // completed iterations int64 (B,); tol <= 0 runs all n_iters.
  m.def(
      "sinkhorn_forward(Tensor C, Tensor log_a, Tensor log_b, float eps, int n_iters, float tol) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // (grad_C, grad_log_a, grad_log_b) of a loss L(f, g) with adjoints grad_f, grad_g, through the recorded iterates.
  m.def(
      "sinkhorn_backward(Tensor C, Tensor log_a, Tensor log_b, float eps, Tensor f_hist, Tensor g_hist, "
      "Tensor n_done, Tensor grad_f, Tensor grad_g) -> (Tensor, Tensor, Tensor)");
  // Q (B, K), rows summing to 1: SwAV / DINOv2 Sinkhorn-Knopp on logits (B, K) at temperature eps, n_iters
  // iterations (prototype update, then sample update) in the log domain; no autograd. CPU only.
  m.def("sinkhorn_knopp(Tensor logits, float eps, int n_iters) -> Tensor");
  // (values, indices) (B, N, k), best first (int64 indices into y's rows): the k largest cosine similarities
  // (metric 0) or inner products (1), or the k smallest Euclidean distances (2), of each row of x (B, N, D) among
  // the rows of y (B, M, D); exclude_self skips the pairs (i, i). Computed in block_rows x block_cols score tiles,
  // never the (N, M) matrix. No gradient (the Python layer recomputes differentiable values from the indices).
  m.def(
      "knn_forward(Tensor x, Tensor y, int k, int metric, bool exclude_self, int block_rows=128, "
      "int block_cols=2048) -> (Tensor, Tensor)");
  // S (B, N, M) = <x_i / max(|x_i|, 1e-12), y_j / max(|y_j|, 1e-12)> / temperature of x (B, N, D), y (B, M, D)
  // (y may be x itself): BLAS products scaled by the inverse norms, no normalised copies. No autograd (see
  // cosine_backward).
  m.def("cosine_forward(Tensor x, Tensor y, float temperature) -> Tensor");
  // (grad_x, grad_y) (B, N, D), (B, M, D) of a loss L(S) of cosine_forward's S, given grad = dL/dS (B, N, M).
  m.def("cosine_backward(Tensor grad, Tensor x, Tensor y, float temperature) -> (Tensor, Tensor)");
  // (loss, neighbours, weights): the neighbourhood-consistency loss L_nc (0-dim, the mean over the valid patches of
  // KL(p_i || q_i) on the k nearest valid teacher neighbours J_i of each valid patch i) of student and teacher
  // (B, N, D) with mask None or (B, N) bool; for the backward, J_i best first (B, N, k) int64 (-1 for invalid
  // patches) and the weights q_i - p_i of the same slots (B, N, k). No autograd (see neighborhood_backward).
  m.def(
      "neighborhood_forward(Tensor student, Tensor teacher, Tensor? mask, int k, float tau_s, float tau_t) "
      "-> (Tensor, Tensor, Tensor)");
  // grad_student (B, N, D) of the loss of neighborhood_forward, from its neighbours and weights and dL/dloss.
  m.def(
      "neighborhood_backward(Tensor student, Tensor? mask, Tensor neighbours, Tensor weights, Tensor grad_loss, "
      "float tau_s) -> Tensor");
}

namespace {

// True when the CUDA sources were compiled in, i.e. their kernels are registered.
PyObject* with_cuda(PyObject* /*module*/, PyObject* /*args*/) {
  const auto op = c10::Dispatcher::singleton().findOp({"s2dc_C::sinkhorn_forward", ""});
  return PyBool_FromLong(op.has_value() && op->hasKernelForDispatchKey(c10::DispatchKey::CUDA));
}

PyMethodDef methods[] = {
    {"with_cuda", with_cuda, METH_NOARGS, "with_cuda() -> bool: whether the CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_C", "Compiled kernels of s2dc_kernels; registers torch.ops.s2dc_C.", -1, methods,
};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module); }

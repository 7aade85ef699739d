// CPU implementations of s2dc_C::neighborhood_forward / neighborhood_backward (schemas in csrc/ops.cpp): the fused
// neighbourhood-consistency loss L_nc around the torch-free kernels of neighborhood.cpp.
//
// Forward: tasks of (problem b, block of rows) spread over torch's intra-op threads (whole problems when there are
// at least two per thread). Each computes the teacher Gram tile <T_i, T_j> of its rows against all N rows of the
// problem with BLAS (at::mm_out, single-threaded inside the parallel region; for a whole problem only the block
// rows on and above the diagonal, the rest mirrored) into a per-thread tile of at most N x N, the inverse row
// norms of the problem's S and T (while they are in cache), and hands them to the kernel (top-k, student dots of
// the k chosen pairs, softmaxes, KL). Outputs: the loss, and for the backward the neighbours and the weights
// q - p, (B, N, k) each. No (B, N, N) temporary, no normalised copy of S or T. The per-task KL sums are added in
// task order (deterministic whatever the threads).
// Backward: one problem per task (its pairs are regrouped by the row they reach, then each gradient row is
// written once).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/neighborhood.h"

namespace s2dc {
namespace {

void check_inputs(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& mask,
                  const char* op) {
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu(), op, ": student and teacher must be CPU tensors");
  TORCH_CHECK(student.scalar_type() == at::kFloat || student.scalar_type() == at::kDouble, op,
              ": student must be float32 or float64, got ", student.scalar_type());
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(), op, ": teacher must have student's dtype ",
              student.scalar_type(), ", got ", teacher.scalar_type());
  TORCH_CHECK(student.dim() == 3 && teacher.sizes() == student.sizes(), op,
              ": student and teacher must be (B, N, D) of the same shape, got ", student.sizes(), " and ",
              teacher.sizes());
  if (mask.has_value()) {
    TORCH_CHECK(mask->device().is_cpu() && mask->scalar_type() == at::kBool, op, ": mask must be a CPU bool tensor");
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == student.size(0) && mask->size(1) == student.size(1), op,
                ": mask must be (B, N) = (", student.size(0), ", ", student.size(1), "), got ", mask->sizes());
  }
}

// Number of valid patches over all problems.
int64_t valid_count(const std::optional<at::Tensor>& mask, int64_t B, int64_t N) {
  return mask.has_value() ? mask->sum().item<int64_t>() : B * N;
}

// The contiguous mask data, or null for "all valid".
const bool* mask_data(const std::optional<at::Tensor>& mask, at::Tensor& holder) {
  if (!mask.has_value()) return nullptr;
  holder = mask->contiguous();
  return holder.const_data_ptr<bool>();
}

// Rows per GEMM of the symmetric teacher Gram matrix of a whole problem (see teacher_gram).
constexpr int64_t kGramBlock = 48;

// The teacher Gram rows [row0, row0 + rows) of problem teacher_b (N, D) against all N rows, into tile (rows, N).
// For a whole problem only the block rows on and above the diagonal are multiplied (about 2/3 of the GEMM work
// at N = 144) and the rest is mirrored.
void teacher_gram(const at::Tensor& teacher_b, int64_t row0, int64_t rows, at::Tensor& tile) {
  const int64_t N = teacher_b.size(0);
  if (rows < N) {
    at::mm_out(tile, teacher_b.narrow(0, row0, rows), teacher_b.t());
    return;
  }
  for (int64_t start = 0; start < N; start += kGramBlock) {
    const int64_t count = std::min(kGramBlock, N - start);
    at::Tensor upper = tile.narrow(0, start, count).narrow(1, start, N - start);
    at::mm_out(upper, teacher_b.narrow(0, start, count), teacher_b.narrow(0, start, N - start).t());
  }
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "neighborhood_mirror", [&] {
    scalar_t* gram = tile.mutable_data_ptr<scalar_t>();
    for (int64_t i = kGramBlock; i < N; ++i) {
      const int64_t below = i / kGramBlock * kGramBlock;  // columns left of row i's diagonal block
      for (int64_t j = 0; j < below; ++j) gram[i * N + j] = gram[j * N + i];
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> neighborhood_forward_cpu(const at::Tensor& student_in,
                                                                        const at::Tensor& teacher_in,
                                                                        const std::optional<at::Tensor>& mask,
                                                                        int64_t k, double tau_s, double tau_t) {
  constexpr const char* op = "neighborhood_forward (cpu)";
  check_inputs(student_in, teacher_in, mask, op);
  const int64_t B = student_in.size(0), N = student_in.size(1), D = student_in.size(2);
  TORCH_CHECK(k >= 1 && k <= N - 1, op, ": k must be in [1, N - 1 = ", N - 1, "], got ", k);
  TORCH_CHECK(tau_s > 0 && tau_t > 0, op, ": tau_s and tau_t must be positive, got ", tau_s, " and ", tau_t);
  // Detached: the worker threads run with their own (default) grad mode, and the op has its own backward.
  const at::Tensor student = student_in.detach().contiguous(), teacher = teacher_in.detach().contiguous();
  at::Tensor neighbours = at::empty({B, N, k}, student.options().dtype(at::kLong));
  at::Tensor weights = at::empty({B, N, k}, student.options());
  at::Tensor mask_holder;
  const bool* valid = mask_data(mask, mask_holder);
  const int64_t count = valid_count(mask, B, N);
  if (B * N == 0) return {at::scalar_tensor(0, student.options()), neighbours, weights};

  // Row blocks: whole problems when there are enough to share out, else split rows (>= 16 per block).
  const int64_t threads = at::get_num_threads();
  const int64_t splits = std::clamp<int64_t>((2 * threads + B - 1) / B, 1, std::max<int64_t>(1, N / 16));
  const int64_t block_rows = (N + splits - 1) / splits;
  const int64_t row_blocks = (N + block_rows - 1) / block_rows;
  std::vector<double> partial_sums(B * row_blocks, 0.0);

  AT_DISPATCH_FLOATING_TYPES(student.scalar_type(), "neighborhood_forward_cpu", [&] {
    int64_t* neighbours_out = neighbours.mutable_data_ptr<int64_t>();
    scalar_t* weights_out = weights.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * row_blocks, 1, [&](int64_t begin, int64_t end) {
      at::Tensor tile = at::empty({block_rows, N}, teacher.options());
      std::vector<scalar_t> student_inv(N), teacher_inv(N);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / row_blocks, row0 = (task % row_blocks) * block_rows;
        const int64_t rows = std::min(block_rows, N - row0);
        const scalar_t* student_b = student.const_data_ptr<scalar_t>() + b * N * D;
        const at::Tensor teacher_b = teacher.select(0, b);
        at::Tensor gram = tile.narrow(0, 0, rows);
        teacher_gram(teacher_b, row0, rows, gram);
        // Norms per task, while the problem's rows are in cache (GEMM and student dots read them next).
        cpu::inverse_row_norms(teacher_b.const_data_ptr<scalar_t>(), N, D, teacher_inv.data());
        cpu::inverse_row_norms(student_b, N, D, student_inv.data());
        const cpu::NeighborhoodProblem<scalar_t> problem{student_b,
                                                         student_inv.data(),
                                                         teacher_inv.data(),
                                                         valid == nullptr ? nullptr : valid + b * N,
                                                         N,
                                                         D,
                                                         k,
                                                         static_cast<scalar_t>(tau_s),
                                                         static_cast<scalar_t>(tau_t)};
        partial_sums[task] = cpu::neighborhood_forward_rows(problem, gram.const_data_ptr<scalar_t>(), N, row0, rows,
                                                            neighbours_out + (b * N + row0) * k,
                                                            weights_out + (b * N + row0) * k);
      }
    });
  });
  double total = 0;
  for (const double sum : partial_sums) total += sum;
  const at::Tensor loss = at::scalar_tensor(total / static_cast<double>(std::max<int64_t>(count, 1)),
                                            student.options());
  return {loss, neighbours, weights};
}

at::Tensor neighborhood_backward_cpu(const at::Tensor& student_in, const std::optional<at::Tensor>& mask,
                                     const at::Tensor& neighbours_in, const at::Tensor& weights_in,
                                     const at::Tensor& grad_loss, double tau_s) {
  constexpr const char* op = "neighborhood_backward (cpu)";
  check_inputs(student_in, student_in, mask, op);
  const int64_t B = student_in.size(0), N = student_in.size(1), D = student_in.size(2);
  TORCH_CHECK(neighbours_in.dim() == 3 && neighbours_in.size(0) == B && neighbours_in.size(1) == N &&
                  neighbours_in.scalar_type() == at::kLong && weights_in.sizes() == neighbours_in.sizes() &&
                  weights_in.scalar_type() == student_in.scalar_type(),
              op, ": neighbours (int64) and weights (student's dtype) must be (B, N, k) with B, N of student");
  TORCH_CHECK(grad_loss.numel() == 1, op, ": grad_loss must have one element, got ", grad_loss.sizes());
  TORCH_CHECK(tau_s > 0, op, ": tau_s must be positive, got ", tau_s);
  const int64_t k = neighbours_in.size(2);
  const at::Tensor student = student_in.detach().contiguous();
  const at::Tensor neighbours = neighbours_in.contiguous(), weights = weights_in.contiguous();
  at::Tensor grad = at::empty_like(student);
  if (B * N == 0) return grad;
  at::Tensor mask_holder;
  const bool* valid = mask_data(mask, mask_holder);
  // dL/d(sum of KL) / tau_s: the loss is the mean over the valid patches.
  const double scale = grad_loss.item<double>() / static_cast<double>(std::max<int64_t>(valid_count(mask, B, N), 1)) /
                       tau_s;
  AT_DISPATCH_FLOATING_TYPES(student.scalar_type(), "neighborhood_backward_cpu", [&] {
    scalar_t* grad_out = grad.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> student_inv(N);
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* student_b = student.const_data_ptr<scalar_t>() + b * N * D;
        cpu::inverse_row_norms(student_b, N, D, student_inv.data());
        const cpu::NeighborhoodProblem<scalar_t> problem{student_b,
                                                         student_inv.data(),
                                                         nullptr,
                                                         valid == nullptr ? nullptr : valid + b * N,
                                                         N,
                                                         D,
                                                         k,
                                                         static_cast<scalar_t>(tau_s),
                                                         scalar_t(1)};
        cpu::neighborhood_backward(problem, neighbours.const_data_ptr<int64_t>() + b * N * k,
                                   weights.const_data_ptr<scalar_t>() + b * N * k, static_cast<scalar_t>(scale),
                                   grad_out + b * N * D);
      }
    });
  });
  return grad;
}

}  // namespace
}  // namespace s2dc

TORCH_LIBRARY_IMPL(s2dc_C, CPU, m) {
  m.impl("neighborhood_forward", &s2dc::neighborhood_forward_cpu);
  m.impl("neighborhood_backward", &s2dc::neighborhood_backward_cpu);
}

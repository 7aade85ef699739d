// CPU implementation of s2dc_C::knn_forward (schema in csrc/ops.cpp): the k best candidates of each query row
// without the (N, M) score matrix. Queries are split into blocks of block_rows rows, spread over torch's intra-op
// threads; each block walks the candidates in chunks of block_cols columns, computes the Gram tile of the two with
// one GEMM (at::mm_out, single-threaded inside the parallel region) and merges it into the block's running top-k
// lists (the torch-free kernels of knn.cpp).
//
// Every metric is a largest-score search over the Gram tiles <x'_i, y'_j> of prepared rows, adjusted per candidate:
//   cosine: x' = x, y' = y, score = <x_i, y_j> s_j with s_j = 1 / max(|y_j|, 1e-12) (the norm clamped as in
//           F.normalize): the cosine similarity times |x_i| (rank-preserving in each row, and no normalised copy
//           of x and y); value = score / max(|x_i|, 1e-12);
//   dot:    x' = x, y' = y, score = value = <x, y>;
//   l2:     x' = x - c, y' = y - c with c the mean row of y (distances are translation invariant; centring keeps
//           the digits of the expansion for data far from 0), score = <x'_i, y'_j> + bias_j with
//           bias_j = -|y'_j|^2 / 2, so score = (|x'_i|^2 - |x_i - y_j|^2) / 2, largest for the nearest y_j. The
//           expansion ranks pairs up to its rounding (pairs whose squared distances differ by less than about
//           eps |x'| |y'| may swap); the values are the exact distances of the chosen pairs, recomputed from the
//           rows of x and y, and each list is re-sorted by them.
// Self search (y is x): the Gram matrix is symmetric, so only the tiles on and above the block diagonal are
// computed, each merged into the lists of its rows and, transposed, into those of its columns (half the GEMM
// work). Lists of one row block are then written by several threads: a mutex per row block guards them, and the
// order of the merges (hence which of equal scores survive) varies between runs.
// Memory: the outputs (B, N, k), two block_rows x block_cols tiles per thread, O(B (N + M)) norms, and for l2 the
// centred rows (the size of x and y). Traffic: x' once, y' once per query block.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <tuple>
#include <vector>

#include "cpu/knn.h"
#include "cpu/pair_checks.h"

namespace s2dc {
namespace {

enum class KnnMetric : int64_t { kCosine = 0, kDot = 1, kL2 = 2 };

// The prepared rows x' (B, N, D), y' (B, M, D) of the header comment, contiguous (y' is x' itself in a self search),
// and the per-candidate scale or bias (B, M) and per-query value scale (B, N) of the metric (undefined: none).
struct PreparedRows {
  at::Tensor x_rows, y_rows, col_scale, col_bias, value_scale;
};

PreparedRows prepare_rows(const at::Tensor& x, const at::Tensor& y, KnnMetric metric) {
  const bool self_search = x.is_same(y);
  const at::Tensor x_rows = x.contiguous();
  const at::Tensor y_rows = self_search ? x_rows : y.contiguous();
  switch (metric) {
    case KnnMetric::kCosine: {
      auto inverse_norms = [](const at::Tensor& t) {
        return at::linalg_vector_norm(t, 2, {-1}).clamp_min_(1e-12).reciprocal_();
      };
      const at::Tensor x_inverse_norms = inverse_norms(x_rows);
      return {x_rows, y_rows, self_search ? x_inverse_norms : inverse_norms(y_rows), at::Tensor(), x_inverse_norms};
    }
    case KnnMetric::kDot:
      return {x_rows, y_rows, at::Tensor(), at::Tensor(), at::Tensor()};
    case KnnMetric::kL2: {
      const at::Tensor centre = y.mean({1}, /*keepdim=*/true);
      const at::Tensor x_centred = x.sub(centre).contiguous();
      const at::Tensor y_centred = self_search ? x_centred : y.sub(centre).contiguous();
      return {x_centred, y_centred, at::Tensor(), y_centred.square().sum(-1).mul_(-0.5).contiguous(), at::Tensor()};
    }
  }
  TORCH_CHECK(false, "knn_forward (cpu): unknown metric ", static_cast<int64_t>(metric));
}

// The lists of rows [row, row + ...) of problem b in the outputs (B, N, k).
template <typename T>
cpu::TopKLists<T> lists_at(T* values, int64_t* indices, int64_t N, int64_t k, int64_t b, int64_t row) {
  return {values + (b * N + row) * k, indices + (b * N + row) * k, k};
}

// The search of the header comment over the prepared rows, into values and indices (B, N, k).
template <typename T>
void knn_search(const PreparedRows& prepared, int64_t k, bool exclude_self, int64_t block_rows, int64_t block_cols,
                T* values, int64_t* indices) {
  const at::Tensor& x_rows = prepared.x_rows;
  const at::Tensor& y_rows = prepared.y_rows;
  const int64_t B = x_rows.size(0), N = x_rows.size(1), M = y_rows.size(1);
  // The per-candidate adjustment of candidates [col, ...) of problem b, or null.
  auto candidates_at = [M](const at::Tensor& t, int64_t b, int64_t col) {
    return t.defined() ? t.const_data_ptr<T>() + b * M + col : nullptr;
  };
  const int64_t row_blocks = (N + block_rows - 1) / block_rows;
  const int64_t tile_cols = std::min(block_cols, M);
  const int64_t tile_size = std::min(block_rows, N) * tile_cols;

  // Scores of rows [row0, row0 + rows) of x' against rows [col0, col0 + cols) of y' (problem b) into tile.
  auto gram_tile = [&](at::Tensor& tile, int64_t b, int64_t row0, int64_t rows, int64_t col0, int64_t cols) {
    at::Tensor scores = tile.narrow(0, 0, rows * cols).view({rows, cols});
    at::mm_out(scores, x_rows.select(0, b).narrow(0, row0, rows), y_rows.select(0, b).narrow(0, col0, cols).t());
    return scores;
  };

  if (!x_rows.is_same(y_rows)) {
    at::parallel_for(0, B * row_blocks, 1, [&](int64_t begin, int64_t end) {
      at::Tensor tile = at::empty({tile_size}, x_rows.options());
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / row_blocks, row0 = (task % row_blocks) * block_rows;
        const int64_t rows = std::min(block_rows, N - row0);
        const cpu::TopKLists<T> lists = lists_at(values, indices, N, k, b, row0);
        cpu::topk_reset(lists, rows);
        for (int64_t col0 = 0; col0 < M; col0 += tile_cols) {
          const int64_t cols = std::min(tile_cols, M - col0);
          const at::Tensor scores = gram_tile(tile, b, row0, rows, col0, cols);
          cpu::topk_merge_tile(scores.const_data_ptr<T>(), rows, cols, cols, col0,
                               candidates_at(prepared.col_scale, b, col0), candidates_at(prepared.col_bias, b, col0),
                               exclude_self, row0, lists);
        }
      }
    });
    return;
  }

  // Self search. Task p of problem b takes the row blocks p and row_blocks - 1 - p: block I computes the tiles
  // of columns [I block_rows, N), so the pair costs about the same for every p (balanced static split).
  cpu::topk_reset(lists_at(values, indices, N, k, 0, 0), B * N);
  std::vector<std::mutex> block_locks(B * row_blocks);
  const int64_t pairs = (row_blocks + 1) / 2;
  at::parallel_for(0, B * pairs, 1, [&](int64_t begin, int64_t end) {
    at::Tensor tile = at::empty({tile_size}, x_rows.options());
    at::Tensor transposed = at::empty({tile_size}, x_rows.options());
    auto upper_tiles = [&](int64_t b, int64_t block) {
      const int64_t row0 = block * block_rows, rows = std::min(block_rows, N - row0);
      for (int64_t col0 = row0; col0 < N; col0 += tile_cols) {
        const int64_t cols = std::min(tile_cols, N - col0);
        const at::Tensor scores = gram_tile(tile, b, row0, rows, col0, cols);
        {
          std::lock_guard<std::mutex> guard(block_locks[b * row_blocks + block]);
          cpu::topk_merge_tile(scores.const_data_ptr<T>(), rows, cols, cols, col0,
                               candidates_at(prepared.col_scale, b, col0), candidates_at(prepared.col_bias, b, col0),
                               exclude_self, row0, lists_at(values, indices, N, k, b, row0));
        }
        // Columns past this row block, transposed: the scores of their rows against this block's candidates.
        const int64_t first = std::max(col0, row0 + rows), count = col0 + cols - first;
        if (count <= 0) continue;
        at::Tensor scores_t = transposed.narrow(0, 0, count * rows).view({count, rows});
        scores_t.copy_(scores.narrow(1, first - col0, count).t());
        const T* scores_t_data = scores_t.const_data_ptr<T>();
        for (int64_t row = first; row < first + count;) {  // one row block (one lock) at a time
          const int64_t row_block = row / block_rows;
          const int64_t stop = std::min((row_block + 1) * block_rows, first + count);
          std::lock_guard<std::mutex> guard(block_locks[b * row_blocks + row_block]);
          cpu::topk_merge_tile(scores_t_data + (row - first) * rows, stop - row, rows, rows, row0,
                               candidates_at(prepared.col_scale, b, row0), candidates_at(prepared.col_bias, b, row0),
                               exclude_self, row, lists_at(values, indices, N, k, b, row));
          row = stop;
        }
      }
    };
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / pairs, p = task % pairs;
      upper_tiles(b, p);
      if (row_blocks - 1 - p != p) upper_tiles(b, row_blocks - 1 - p);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> knn_forward_cpu(const at::Tensor& x, const at::Tensor& y, int64_t k,
                                                   int64_t metric_code, bool exclude_self, int64_t block_rows,
                                                   int64_t block_cols) {
  constexpr const char* op = "knn_forward (cpu)";
  check_cpu_pair(x, y, op);
  TORCH_CHECK(metric_code >= 0 && metric_code <= 2, op, ": metric must be 0 (cosine), 1 (dot) or 2 (l2), got ",
              metric_code);
  const int64_t B = x.size(0), N = x.size(1), M = y.size(1), D = x.size(2);
  TORCH_CHECK(!exclude_self || M == N, op, ": exclude_self needs M == N, got N = ", N, ", M = ", M);
  TORCH_CHECK(k >= 1 && k <= M - exclude_self, op, ": k must be in [1, ", M - exclude_self, "], got ", k);
  TORCH_CHECK(block_rows >= 1 && block_cols >= 1, op, ": block_rows and block_cols must be >= 1, got ",
              block_rows, " and ", block_cols);
  const auto metric = static_cast<KnnMetric>(metric_code);

  at::Tensor values = at::empty({B, N, k}, x.options());
  at::Tensor indices = at::empty({B, N, k}, x.options().dtype(at::kLong));
  if (B * N == 0) return {values, indices};
  // Detached: the worker threads run with their own (default) grad mode, and the op has no gradient.
  const at::Tensor x_data = x.detach(), y_data = x.is_same(y) ? x_data : y.detach();
  const PreparedRows prepared = prepare_rows(x_data, y_data, metric);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "knn_forward_cpu", [&] {
    scalar_t* values_out = values.mutable_data_ptr<scalar_t>();
    int64_t* indices_out = indices.mutable_data_ptr<int64_t>();
    knn_search(prepared, k, exclude_self, block_rows, block_cols, values_out, indices_out);
    if (prepared.value_scale.defined()) values.mul_(prepared.value_scale.unsqueeze(-1));
    if (metric != KnnMetric::kL2) return;
    const at::Tensor x_exact = x_data.contiguous(), y_exact = y_data.contiguous();
    at::parallel_for(0, B * N, block_rows, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end;) {  // rows of one problem at a time
        const int64_t b = row / N, stop = std::min(end, (b + 1) * N);
        cpu::l2_exact_distances(x_exact.const_data_ptr<scalar_t>() + row * D,
                                y_exact.const_data_ptr<scalar_t>() + b * M * D, stop - row, D,
                                lists_at(values_out, indices_out, N, k, 0, row));
        row = stop;
      }
    });
  });
  return {values, indices};
}

}  // namespace
}  // namespace s2dc

TORCH_LIBRARY_IMPL(s2dc_C, CPU, m) { m.impl("knn_forward", &s2dc::knn_forward_cpu); }

// Running top-k selection for the fused k-NN on the CPU: merges tiles of scores into per-row lists of the k largest,
// and the exact Euclidean distances of chosen pairs. Torch-free (raw pointers), so the C++ unit tests link it
// without libtorch; the binding (knn_binding.cpp) computes the score tiles and runs rows in parallel.
#pragma once

#include <cstdint>

namespace s2dc::cpu {

// Running top-k lists of `rows` rows, row-major: row r holds values[r k .. r k + k) in descending order and the
// candidates they belong to in indices[r k ..). An empty slot holds value -inf and index -1.
template <typename T>
struct TopKLists {
  T* values;
  int64_t* indices;
  int64_t k;
};

// Empties rows [0, rows) of the lists.
template <typename T>
void topk_reset(const TopKLists<T>& lists, int64_t rows);

// Merges a tile of scores into the lists: row r (r < rows) scores candidate col_offset + c (c < cols) by
// tile[r * ld + c] * col_scale[c], or tile[r * ld + c] + col_bias[c], or the tile entry itself (at most one of
// col_scale and col_bias is non-null: one rounding, so no fused multiply-add changes a score); a candidate enters
// a row when its score beats the row's k-th (ties keep the earlier entry). With exclude_self, row r never takes
// candidate self_offset + r (its own index in a self search). Scores must not be NaN. Cost: one compare per score
// (vectorised, chunks of candidates skipped at once) plus an insertion of at most k moves per accepted candidate,
// about k log(M / k) per row for scores in random order.
template <typename T>
void topk_merge_tile(const T* tile, int64_t rows, int64_t cols, int64_t ld, int64_t col_offset, const T* col_scale,
                     const T* col_bias, bool exclude_self, int64_t self_offset, const TopKLists<T>& lists);

// For the lists of `rows` rows of queries x (rows, d) over candidates y (m, d), both row-major: replaces each
// value by the exact distance sqrt(max(sum_l (x_r,l - y_j,l)^2, 0)) of its pair, computed from the rows (no
// cancellation, whatever ranked them), and re-sorts each row by ascending distance.
template <typename T>
void l2_exact_distances(const T* x, const T* y, int64_t rows, int64_t d, const TopKLists<T>& lists);

}  // namespace s2dc::cpu

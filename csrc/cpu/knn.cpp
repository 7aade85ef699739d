// Running top-k selection for the fused k-NN on the CPU (see knn.h for the contract).
//
// Each row keeps its k best scores sorted in descending order, so the admission threshold is the last one. A tile
// row is scanned in chunks: a vectorised any(score > threshold) over the chunk first, and only a chunk that holds a
// candidate is walked one score at a time, inserting by shifting the worse entries down. The threshold only rises,
// so after the first few chunks of a row almost every chunk is skipped on one vector compare per score.
#include "knn.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "target_clones.h"  // the chunk scan is compiled per instruction set

namespace s2dc::cpu {
namespace {

// Candidates per chunk of the threshold scan: a few vector registers of scores.
constexpr int64_t kChunk = 64;

// Inserts (score, index) into a full descending list of k entries whose last entry it beats.
template <typename T>
[[gnu::always_inline]] inline void insert_sorted(T* values, int64_t* indices, int64_t k, T score, int64_t index) {
  int64_t slot = k - 1;
  while (slot > 0 && values[slot - 1] < score) {
    values[slot] = values[slot - 1];
    indices[slot] = indices[slot - 1];
    --slot;
  }
  values[slot] = score;
  indices[slot] = index;
}

// The score of a tile entry: entry * scale or entry + bias when the kernel has one (compile time). One rounding
// either way, so the score does not depend on whether the instruction set fuses a multiply-add.
template <typename T, bool kScaled, bool kBiased>
[[gnu::always_inline]] inline T adjusted(T entry, const T* __restrict scale, const T* __restrict bias, int64_t c) {
  static_assert(!(kScaled && kBiased));
  if constexpr (kScaled) return entry * scale[c];
  if constexpr (kBiased) return entry + bias[c];
  return entry;
}

// topk_merge_tile with the scale and bias known at compile time, so that the plain scan is one compare per score.
template <typename T, bool kScaled, bool kBiased>
S2DC_TARGET_CLONES void merge_rows(const T* __restrict tile, int64_t rows, int64_t cols, int64_t ld,
                                   int64_t col_offset, const T* __restrict col_scale, const T* __restrict col_bias,
                                   bool exclude_self, int64_t self_offset, T* __restrict values,
                                   int64_t* __restrict indices, int64_t k) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict scores = tile + r * ld;
    T* row_values = values + r * k;
    int64_t* row_indices = indices + r * k;
    // The tile column of this row's own candidate (outside [0, cols) when it is not in the tile).
    const int64_t self_col = exclude_self ? self_offset + r - col_offset : -1;
    T threshold = row_values[k - 1];
    for (int64_t begin = 0; begin < cols; begin += kChunk) {
      const int64_t end = std::min(begin + kChunk, cols);
      int any = 0;
#pragma omp simd reduction(| : any)
      for (int64_t c = begin; c < end; ++c) {
        any |= adjusted<T, kScaled, kBiased>(scores[c], col_scale, col_bias, c) > threshold;
      }
      if (!any) continue;
      for (int64_t c = begin; c < end; ++c) {
        const T score = adjusted<T, kScaled, kBiased>(scores[c], col_scale, col_bias, c);
        if (score > threshold && c != self_col) {
          insert_sorted(row_values, row_indices, k, score, col_offset + c);
          threshold = row_values[k - 1];
        }
      }
    }
  }
}

}  // namespace

template <typename T>
void topk_reset(const TopKLists<T>& lists, int64_t rows) {
  std::fill(lists.values, lists.values + rows * lists.k, -std::numeric_limits<T>::infinity());
  std::fill(lists.indices, lists.indices + rows * lists.k, int64_t{-1});
}

template <typename T>
void topk_merge_tile(const T* tile, int64_t rows, int64_t cols, int64_t ld, int64_t col_offset, const T* col_scale,
                     const T* col_bias, bool exclude_self, int64_t self_offset, const TopKLists<T>& lists) {
  const auto merge = [&](auto kernel) {
    kernel(tile, rows, cols, ld, col_offset, col_scale, col_bias, exclude_self, self_offset, lists.values,
           lists.indices, lists.k);
  };
  if (col_scale != nullptr) {
    merge(merge_rows<T, true, false>);
  } else if (col_bias != nullptr) {
    merge(merge_rows<T, false, true>);
  } else {
    merge(merge_rows<T, false, false>);
  }
}

template <typename T>
void l2_exact_distances(const T* x, const T* y, int64_t rows, int64_t d, const TopKLists<T>& lists) {
  const int64_t k = lists.k;
  for (int64_t r = 0; r < rows; ++r) {
    T* row_values = lists.values + r * k;
    int64_t* row_indices = lists.indices + r * k;
    const T* query = x + r * d;
    for (int64_t slot = 0; slot < k; ++slot) {
      const T* candidate = y + row_indices[slot] * d;
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t l = 0; l < d; ++l) {
        const T diff = query[l] - candidate[l];
        sum += diff * diff;
      }
      row_values[slot] = std::sqrt(std::max(sum, T(0)));
    }
    // Insertion sort by ascending distance: k is small and the ranking scores left the list nearly sorted.
    for (int64_t slot = 1; slot < k; ++slot) {
      const T value = row_values[slot];
      const int64_t index = row_indices[slot];
      int64_t to = slot;
      while (to > 0 && row_values[to - 1] > value) {
        row_values[to] = row_values[to - 1];
        row_indices[to] = row_indices[to - 1];
        --to;
      }
      row_values[to] = value;
      row_indices[to] = index;
    }
  }
}

template void topk_reset<float>(const TopKLists<float>&, int64_t);
template void topk_reset<double>(const TopKLists<double>&, int64_t);
template void topk_merge_tile<float>(const float*, int64_t, int64_t, int64_t, int64_t, const float*, const float*,
                                     bool, int64_t, const TopKLists<float>&);
template void topk_merge_tile<double>(const double*, int64_t, int64_t, int64_t, int64_t, const double*,
                                      const double*, bool, int64_t, const TopKLists<double>&);
template void l2_exact_distances<float>(const float*, const float*, int64_t, int64_t, const TopKLists<float>&);
template void l2_exact_distances<double>(const double*, const double*, int64_t, int64_t, const TopKLists<double>&);

}  // namespace s2dc::cpu

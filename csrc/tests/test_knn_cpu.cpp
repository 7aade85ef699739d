// Unit tests of the running top-k selection of the fused CPU k-NN (csrc/cpu/knn.cpp): merging a score matrix tile by
// tile, in any tiling, with a column scale, a column bias or neither, must give the k largest scores of each row
// sorted descending (against a full sort), in float and double, with ties, the self exclusion, k = 1 and k = M; the
// exact l2 distances must match a direct loop and come out sorted ascending.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cpu/knn.h"
#include "tests/check.h"

namespace {

using s2dc_test::check;

// Scores of an n x m matrix: random, or with many ties (a few distinct values).
template <typename T>
std::vector<T> make_scores(int64_t n, int64_t m, bool ties, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  std::uniform_int_distribution<int> level(0, 3);
  std::vector<T> scores(n * m);
  for (T& s : scores) s = ties ? T(level(rng)) : T(normal(rng));
  return scores;
}

// Merges scores (n x m) tile by tile (block_rows x block_cols), with a column scale, a column bias or neither, into
// the lists and checks them against a full sort of each row of scores * scale or scores + bias: the values are its k
// largest (excluding column i of row i with exclude_self) in descending order, and every index is distinct, in
// range and carries its value.
template <typename T>
void check_merge(const std::string& name, int64_t n, int64_t m, int64_t k, int64_t block_rows, int64_t block_cols,
                 bool exclude_self, bool ties, bool scaled, bool biased, uint64_t seed) {
  const std::vector<T> tile_scores = make_scores<T>(n, m, ties, seed);
  std::vector<T> scale = make_scores<T>(1, m, false, seed + 1000), bias = make_scores<T>(1, m, ties, seed + 2000);
  for (T& s : scale) s = std::abs(s) + T(0.5);
  std::vector<T> scores(n * m);  // what the lists must select from
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < m; ++j) {
      T score = tile_scores[i * m + j];
      if (scaled) score *= scale[j];
      if (biased) score += bias[j];
      scores[i * m + j] = score;
    }
  }
  std::vector<T> values(n * k);
  std::vector<int64_t> indices(n * k);
  for (int64_t row0 = 0; row0 < n; row0 += block_rows) {
    const int64_t rows = std::min(block_rows, n - row0);
    const s2dc::cpu::TopKLists<T> lists{values.data() + row0 * k, indices.data() + row0 * k, k};
    s2dc::cpu::topk_reset(lists, rows);
    for (int64_t col0 = 0; col0 < m; col0 += block_cols) {
      const int64_t cols = std::min(block_cols, m - col0);
      // The tile as the binding holds it: a packed rows x cols copy.
      std::vector<T> tile(rows * cols);
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < cols; ++c) tile[r * cols + c] = tile_scores[(row0 + r) * m + col0 + c];
      }
      const T* tile_scale = scaled ? scale.data() + col0 : nullptr;
      const T* tile_bias = biased ? bias.data() + col0 : nullptr;
      s2dc::cpu::topk_merge_tile(tile.data(), rows, cols, cols, col0, tile_scale, tile_bias, exclude_self, row0,
                                 lists);
    }
  }
  bool ok = true;
  for (int64_t i = 0; i < n && ok; ++i) {
    std::vector<T> expected;
    for (int64_t j = 0; j < m; ++j) {
      if (!(exclude_self && j == i)) expected.push_back(scores[i * m + j]);
    }
    std::sort(expected.begin(), expected.end(), std::greater<T>());
    std::vector<int64_t> seen;
    for (int64_t slot = 0; slot < k; ++slot) {
      const T value = values[i * k + slot];
      const int64_t j = indices[i * k + slot];
      ok = ok && value == expected[slot] && j >= 0 && j < m && scores[i * m + j] == value;
      ok = ok && !(exclude_self && j == i);
      seen.push_back(j);
    }
    std::sort(seen.begin(), seen.end());
    ok = ok && std::adjacent_find(seen.begin(), seen.end()) == seen.end();
  }
  check(ok, name);
}

// Lists holding arbitrary candidates of each query, their values then replaced by exact distances: they must equal a
// double-precision loop (to the dtype's rounding) and be sorted ascending, the indices permuted along.
template <typename T>
void check_l2_exact(const std::string& name, int64_t rows, int64_t m, int64_t d, int64_t k, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  std::vector<T> x(rows * d), y(m * d);
  for (T& v : x) v = T(100 + normal(rng));  // far from 0: the distances come from differences, not norms
  for (T& v : y) v = T(100 + normal(rng));
  std::vector<int64_t> candidates(m);
  std::iota(candidates.begin(), candidates.end(), int64_t{0});
  std::vector<T> values(rows * k, T(0));
  std::vector<int64_t> indices(rows * k);
  for (int64_t r = 0; r < rows; ++r) {
    std::shuffle(candidates.begin(), candidates.end(), rng);
    std::copy(candidates.begin(), candidates.begin() + k, indices.begin() + r * k);
  }
  const std::vector<int64_t> chosen = indices;
  s2dc::cpu::l2_exact_distances(x.data(), y.data(), rows, d, s2dc::cpu::TopKLists<T>{values.data(), indices.data(), k});
  const double tol = 8 * std::numeric_limits<T>::epsilon();
  bool ok = true;
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<int64_t> before(chosen.begin() + r * k, chosen.begin() + (r + 1) * k);
    std::vector<int64_t> after(indices.begin() + r * k, indices.begin() + (r + 1) * k);
    std::sort(before.begin(), before.end());
    std::sort(after.begin(), after.end());
    ok = ok && before == after;
    for (int64_t slot = 0; slot < k; ++slot) {
      const int64_t j = indices[r * k + slot];
      double sum = 0;
      for (int64_t l = 0; l < d; ++l) {
        const double diff = double(x[r * d + l]) - double(y[j * d + l]);
        sum += diff * diff;
      }
      const double exact = std::sqrt(sum);
      ok = ok && std::abs(double(values[r * k + slot]) - exact) <= tol * (1 + exact);
      ok = ok && (slot == 0 || values[r * k + slot - 1] <= values[r * k + slot]);
    }
  }
  check(ok, name);
}

template <typename T>
void run_all(const char* dtype) {
  const std::string tag = std::string(" [") + dtype + "]";
  // (n, m, k, block_rows, block_cols): one tile, odd tilings, k = 1, k = m, chunks of the scan cut by tiles.
  struct Shape {
    int64_t n, m, k, block_rows, block_cols;
  };
  const Shape shapes[] = {{9, 13, 4, 128, 2048}, {9, 13, 4, 2, 3}, {17, 300, 8, 5, 7},  {17, 300, 8, 16, 64},
                          {6, 6, 1, 4, 5},        {6, 6, 6, 4, 5},   {33, 200, 16, 8, 97}, {3, 1000, 20, 3, 130}};
  uint64_t seed = 1;
  for (const Shape& s : shapes) {
    for (bool ties : {false, true}) {
      for (int adjust = 0; adjust < 3; ++adjust) {  // neither, scale, bias
        const bool scaled = adjust & 1, biased = adjust & 2;
        const std::string name = std::to_string(s.n) + "x" + std::to_string(s.m) + " k" + std::to_string(s.k) +
                                 " tiles " + std::to_string(s.block_rows) + "x" + std::to_string(s.block_cols) +
                                 (ties ? " ties" : "") + (scaled ? " scaled" : "") + (biased ? " biased" : "") + tag;
        check_merge<T>("merge " + name, s.n, s.m, s.k, s.block_rows, s.block_cols, false, ties, scaled, biased,
                       seed++);
        if (s.n == s.m && s.k < s.m) {
          check_merge<T>("merge exclude_self " + name, s.n, s.m, s.k, s.block_rows, s.block_cols, true, ties, scaled,
                         biased, seed++);
        }
      }
    }
  }
  // Self exclusion in square searches cut into tiles that do not align with the diagonal.
  check_merge<T>("merge exclude_self 50x50 k49" + tag, 50, 50, 49, 7, 11, true, false, false, false, seed++);
  check_merge<T>("merge exclude_self 70x70 k3" + tag, 70, 70, 3, 16, 9, true, true, false, true, seed++);
  check_l2_exact<T>("l2 exact distances" + tag, 7, 40, 13, 5, seed++);
  check_l2_exact<T>("l2 exact distances k = m" + tag, 3, 9, 70, 9, seed++);
}

}  // namespace

int main() {
  run_all<float>("float");
  run_all<double>("double");
  return s2dc_test::report();
}

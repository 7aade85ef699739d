// Unit tests of the fused neighbourhood-consistency loss (csrc/cpu/neighborhood.cpp): the forward, run over the
// whole problem or in row blocks, must pick the neighbours of a full sort of the teacher cosines (self and invalid
// patches excluded), give the loss of a direct double-precision evaluation of the formula, and the backward must
// match central finite differences of that evaluation; in float and double, with masks, k = 1, k = valid - 1,
// a row with too few candidates (NaN) and ties (duplicated teacher rows: the smaller index first).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cpu/neighborhood.h"
#include "tests/check.h"

namespace {

using s2dc_test::check;

std::vector<double> unit_rows(const std::vector<double>& x, int64_t n, int64_t d) {
  std::vector<double> unit(x);
  for (int64_t i = 0; i < n; ++i) {
    double sum = 0;
    for (int64_t l = 0; l < d; ++l) sum += x[i * d + l] * x[i * d + l];
    const double norm = std::max(std::sqrt(sum), 1e-12);
    for (int64_t l = 0; l < d; ++l) unit[i * d + l] /= norm;
  }
  return unit;
}

double unit_dot(const std::vector<double>& u, int64_t i, int64_t j, int64_t d) {
  double sum = 0;
  for (int64_t l = 0; l < d; ++l) sum += u[i * d + l] * u[j * d + l];
  return sum;
}

// The neighbours of each valid row by a full (stable) sort of the teacher cosines, best first; -1 for invalid rows.
std::vector<int64_t> sorted_neighbours(const std::vector<double>& teacher, const std::vector<char>& valid, int64_t n,
                                       int64_t d, int64_t k) {
  const std::vector<double> unit = unit_rows(teacher, n, d);
  std::vector<int64_t> out(n * k, -1);
  for (int64_t i = 0; i < n; ++i) {
    if (!valid[i]) continue;
    std::vector<int64_t> candidates;
    for (int64_t j = 0; j < n; ++j) {
      if (j != i && valid[j]) candidates.push_back(j);
    }
    std::stable_sort(candidates.begin(), candidates.end(),
                     [&](int64_t a, int64_t b) { return unit_dot(unit, i, a, d) > unit_dot(unit, i, b, d); });
    for (int64_t l = 0; l < k; ++l) out[i * k + l] = candidates[l];
  }
  return out;
}

// Sum over valid rows of KL(p_i || q_i) on the given neighbours, evaluated directly in double.
double direct_loss(const std::vector<double>& student, const std::vector<double>& teacher,
                   const std::vector<int64_t>& neighbours, const std::vector<char>& valid, int64_t n, int64_t d,
                   int64_t k, double tau_s, double tau_t) {
  const std::vector<double> s_unit = unit_rows(student, n, d), t_unit = unit_rows(teacher, n, d);
  double total = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!valid[i]) continue;
    std::vector<double> a(k), b(k);
    for (int64_t l = 0; l < k; ++l) {
      a[l] = unit_dot(t_unit, i, neighbours[i * k + l], d) / tau_t;
      b[l] = unit_dot(s_unit, i, neighbours[i * k + l], d) / tau_s;
    }
    double za = 0, zb = 0;
    for (int64_t l = 0; l < k; ++l) za += std::exp(a[l]), zb += std::exp(b[l]);
    for (int64_t l = 0; l < k; ++l) {
      const double p = std::exp(a[l]) / za;
      total += p * (std::log(p) - (b[l] - std::log(zb)));
    }
  }
  return total;
}

template <typename T>
std::vector<T> cast(const std::vector<double>& x) {
  return std::vector<T>(x.begin(), x.end());
}

// Forward (in blocks of block_rows rows) and backward of one problem against the direct evaluation.
template <typename T>
void check_problem(const std::string& name, const std::vector<double>& student, const std::vector<double>& teacher,
                   const std::vector<char>& valid_mask, bool masked, int64_t n, int64_t d, int64_t k,
                   int64_t block_rows) {
  const double tau_s = 0.1, tau_t = 0.04;
  const double tol = sizeof(T) == 8 ? 1e-9 : 2e-4;
  const std::vector<T> s = cast<T>(student), t = cast<T>(teacher);
  std::vector<T> s_inv(n), t_inv(n);
  s2dc::cpu::inverse_row_norms(s.data(), n, d, s_inv.data());
  s2dc::cpu::inverse_row_norms(t.data(), n, d, t_inv.data());
  std::vector<T> gram(n * n);  // <T_i, T_j> in T's precision
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      T sum = 0;
      for (int64_t l = 0; l < d; ++l) sum += t[i * d + l] * t[j * d + l];
      gram[i * n + j] = sum;
    }
  }
  std::unique_ptr<bool[]> valid(new bool[n]);
  for (int64_t i = 0; i < n; ++i) valid[i] = valid_mask[i];
  const s2dc::cpu::NeighborhoodProblem<T> problem{
      s.data(), s_inv.data(), t_inv.data(), masked ? valid.get() : nullptr, n, d, k, T(tau_s), T(tau_t)};
  std::vector<int64_t> neighbours(n * k);
  std::vector<T> weights(n * k);
  double loss = 0;
  for (int64_t row0 = 0; row0 < n; row0 += block_rows) {
    const int64_t rows = std::min(block_rows, n - row0);
    loss += s2dc::cpu::neighborhood_forward_rows(problem, gram.data() + row0 * n, n, row0, rows,
                                                 neighbours.data() + row0 * k, weights.data() + row0 * k);
  }
  const std::vector<int64_t> expected = sorted_neighbours(teacher, valid_mask, n, d, k);
  check(neighbours == expected, name + ": neighbours");
  const double direct = direct_loss(student, teacher, expected, valid_mask, n, d, k, tau_s, tau_t);
  check(std::abs(loss - direct) <= tol * (1 + std::abs(direct)),
        name + ": loss " + std::to_string(loss) + " vs " + std::to_string(direct));

  // Backward of the sum of KL (scale = 1 / tau_s) against central differences in double.
  std::vector<T> grad(n * d);
  s2dc::cpu::neighborhood_backward(problem, neighbours.data(), weights.data(), T(1 / tau_s), grad.data());
  double worst = 0;
  const double h = 1e-6;
  std::vector<double> moved(student);
  for (int64_t e = 0; e < n * d; e += std::max<int64_t>(1, (n * d) / 60)) {
    moved[e] = student[e] + h;
    const double up = direct_loss(moved, teacher, expected, valid_mask, n, d, k, tau_s, tau_t);
    moved[e] = student[e] - h;
    const double down = direct_loss(moved, teacher, expected, valid_mask, n, d, k, tau_s, tau_t);
    moved[e] = student[e];
    const double numeric = (up - down) / (2 * h);
    worst = std::max(worst, std::abs(double(grad[e]) - numeric) / (1 + std::abs(numeric)));
  }
  check(worst <= (sizeof(T) == 8 ? 1e-6 : 2e-3), name + ": gradient error " + std::to_string(worst));
}

std::vector<double> normal_rows(int64_t n, int64_t d, std::mt19937_64& rng) {
  std::normal_distribution<double> normal;
  std::vector<double> x(n * d);
  for (double& v : x) v = normal(rng);
  return x;
}

template <typename T>
void run_all(const char* dtype) {
  const std::string tag = std::string(" [") + dtype + "]";
  struct Shape {
    int64_t n, d, k, block_rows;
    bool masked;
  };
  const Shape shapes[] = {{13, 7, 3, 13, false}, {13, 7, 3, 4, true},  {29, 17, 1, 5, true},
                          {20, 9, 19, 7, false}, {20, 9, 12, 20, true}, {37, 33, 8, 10, true}};
  std::mt19937_64 rng(7);
  for (const Shape& shape : shapes) {
    const int64_t n = shape.n, d = shape.d;
    const std::vector<double> student = normal_rows(n, d, rng), teacher = normal_rows(n, d, rng);
    std::vector<char> valid(n, 1);
    if (shape.masked) {  // drop a few patches, keeping k + 1 valid ones
      for (int64_t i = 0; i < n && std::count(valid.begin(), valid.end(), 1) > shape.k + 1; i += 3) valid[i] = 0;
    }
    const std::string name = std::to_string(n) + "x" + std::to_string(d) + " k" + std::to_string(shape.k) +
                             " blocks of " + std::to_string(shape.block_rows) + (shape.masked ? " masked" : "") +
                             tag;
    check_problem<T>(name, student, teacher, valid, shape.masked, n, d, shape.k, shape.block_rows);
  }

  // Ties: duplicated teacher rows (the smaller index must come first), student close to the teacher.
  {
    const int64_t n = 12, d = 5, k = 4;
    std::vector<double> teacher = normal_rows(n, d, rng);
    for (int64_t i = 6; i < n; ++i) std::copy_n(teacher.begin() + (i - 6) * d, d, teacher.begin() + i * d);
    std::vector<double> student = normal_rows(n, d, rng);
    for (int64_t e = 0; e < n * d; ++e) student[e] = teacher[e] + 0.3 * student[e];
    check_problem<T>("ties" + tag, student, teacher, std::vector<char>(n, 1), false, n, d, k, 5);
  }

  // A valid row with fewer than k valid candidates: neighbours -1 and a NaN loss.
  {
    const int64_t n = 6, d = 4, k = 3;
    const std::vector<double> rows = normal_rows(n, d, rng);
    const std::vector<T> x = cast<T>(rows);
    std::vector<T> inv(n), gram(n * n, T(0.5));
    s2dc::cpu::inverse_row_norms(x.data(), n, d, inv.data());
    const bool valid[n] = {true, true, true, false, false, false};
    const s2dc::cpu::NeighborhoodProblem<T> problem{x.data(), inv.data(), inv.data(), valid, n, d, k, T(0.1),
                                                    T(0.04)};
    std::vector<int64_t> neighbours(n * k);
    std::vector<T> weights(n * k);
    const T loss = s2dc::cpu::neighborhood_forward_rows(problem, gram.data(), n, 0, n, neighbours.data(),
                                                        weights.data());
    check(std::isnan(loss) && std::count(neighbours.begin(), neighbours.end(), -1) == n * k,
          "too few candidates" + tag);
  }
}

}  // namespace

int main() {
  run_all<float>("float");
  run_all<double>("double");
  return s2dc_test::report();
}

// Unit tests of the fused cosine-similarity passes (csrc/cpu/cosine.cpp): the scaling must give the formula for
// contiguous, strided and broadcast (stride 0) inputs and in place; the forward assembled as in the binding (raw
// products, then the scaling) must match the cosines of normalised rows evaluated in double; and the backward
// assembled as in the binding (scaled copy of G, products, projection) must match central finite differences of
// L = sum_ij W_ij S_ij, for x and y, a row clamped at the 1e-12 norm (no Jacobian term) and a zero row, in float
// and double.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "cpu/cosine.h"
#include "cpu/neighborhood.h"
#include "tests/check.h"

namespace {

using s2dc_test::check;

std::vector<double> normal_values(int64_t count, std::mt19937_64& rng) {
  std::normal_distribution<double> normal;
  std::vector<double> out(count);
  for (double& v : out) v = normal(rng);
  return out;
}

template <typename T>
std::vector<T> cast(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}

// a (n, k) times b (m, k)^T, row-major, in double.
std::vector<double> products(const std::vector<double>& a, const std::vector<double>& b, int64_t n, int64_t m,
                             int64_t k) {
  std::vector<double> out(n * m, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < m; ++j)
      for (int64_t l = 0; l < k; ++l) out[i * m + j] += a[i * k + l] * b[j * k + l];
  return out;
}

// S = cos(x_i, y_j) / t directly in double (norms clamped at 1e-12).
std::vector<double> direct_cosines(const std::vector<double>& x, const std::vector<double>& y, int64_t n, int64_t m,
                                   int64_t d, double t) {
  auto unit = [d](std::vector<double> rows) {
    for (int64_t r = 0; r * d < static_cast<int64_t>(rows.size()); ++r) {
      double sum = 0;
      for (int64_t l = 0; l < d; ++l) sum += rows[r * d + l] * rows[r * d + l];
      const double norm = std::max(std::sqrt(sum), 1e-12);
      for (int64_t l = 0; l < d; ++l) rows[r * d + l] /= norm;
    }
    return rows;
  };
  std::vector<double> s = products(unit(x), unit(y), n, m, d);
  for (double& v : s) v /= t;
  return s;
}

// The forward as the binding runs it, in T: inverse norms, raw products (rounded to T), scaling in place.
template <typename T>
std::vector<T> forward(const std::vector<T>& x, const std::vector<T>& y, int64_t n, int64_t m, int64_t d, T t) {
  std::vector<T> a(n), b(m);
  s2dc::cpu::inverse_row_norms(x.data(), n, d, a.data());
  s2dc::cpu::inverse_row_norms(y.data(), m, d, b.data());
  const std::vector<T> s = cast<T>(products(std::vector<double>(x.begin(), x.end()),
                                            std::vector<double>(y.begin(), y.end()), n, m, d));
  std::vector<T> out(s);
  s2dc::cpu::scale_rows_and_columns(out.data(), m, 1, n, m, a.data(), T(1) / t, b.data(), out.data());
  return out;
}

// The backward as the binding runs it, in T: H = a G b / t, r = H y, r' = H^T x, then the projections.
template <typename T>
void backward(const std::vector<T>& g, const std::vector<T>& x, const std::vector<T>& y, int64_t n, int64_t m,
              int64_t d, T t, std::vector<T>& grad_x, std::vector<T>& grad_y) {
  std::vector<T> a(n), b(m), h(n * m);
  s2dc::cpu::inverse_row_norms(x.data(), n, d, a.data());
  s2dc::cpu::inverse_row_norms(y.data(), m, d, b.data());
  s2dc::cpu::scale_rows_and_columns(g.data(), m, 1, n, m, a.data(), T(1) / t, b.data(), h.data());
  grad_x.assign(n * d, T(0));
  grad_y.assign(m * d, T(0));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < m; ++j)
      for (int64_t l = 0; l < d; ++l) {
        grad_x[i * d + l] += h[i * m + j] * y[j * d + l];
        grad_y[j * d + l] += h[i * m + j] * x[i * d + l];
      }
  s2dc::cpu::project_out_rows(x.data(), n, d, grad_x.data());
  s2dc::cpu::project_out_rows(y.data(), m, d, grad_y.data());
}

template <typename T>
void run_all(const std::string& type) {
  std::mt19937_64 rng(7);
  const double tol = sizeof(T) == 8 ? 1e-12 : 2e-6;

  // Scaling: contiguous, strided (a transposed view), broadcast rows (stride 0), in place.
  {
    const int64_t rows = 5, cols = 7;
    const std::vector<double> in = normal_values(rows * cols, rng), rs = normal_values(rows, rng),
                              cs = normal_values(cols, rng);
    const std::vector<T> in_t = cast<T>(in), rs_t = cast<T>(rs), cs_t = cast<T>(cs);
    const T factor = T(0.25);
    auto expect = [&](const std::vector<T>& out, auto value_at, const std::string& what) {
      bool ok = true;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) {
          const double want = value_at(r, c) * rs[r] * 0.25 * cs[c];
          ok = ok && std::abs(out[r * cols + c] - want) <= tol * (1 + std::abs(want));
        }
      check(ok, "scale " + what + " " + type);
    };
    std::vector<T> out(rows * cols);
    s2dc::cpu::scale_rows_and_columns(in_t.data(), cols, 1, rows, cols, rs_t.data(), factor, cs_t.data(),
                                      out.data());
    expect(out, [&](int64_t r, int64_t c) { return in[r * cols + c]; }, "contiguous");
    // in_t read as its transpose's top-left (rows x cols) corner: element (r, c) at in_t[c * rows + r].
    s2dc::cpu::scale_rows_and_columns(in_t.data(), 1, rows, rows, cols, rs_t.data(), factor, cs_t.data(),
                                      out.data());
    expect(out, [&](int64_t r, int64_t c) { return in[c * rows + r]; }, "strided");
    s2dc::cpu::scale_rows_and_columns(in_t.data(), 0, 0, rows, cols, rs_t.data(), factor, cs_t.data(), out.data());
    expect(out, [&](int64_t, int64_t) { return in[0]; }, "broadcast");
    out = in_t;
    s2dc::cpu::scale_rows_and_columns(out.data(), cols, 1, rows, cols, rs_t.data(), factor, cs_t.data(),
                                      out.data());
    expect(out, [&](int64_t r, int64_t c) { return in[r * cols + c]; }, "in place");
  }

  // Forward and backward against the direct formula and finite differences (x row 1 clamped, y row 2 zero).
  const int64_t n = 6, m = 5, d = 9;
  const double t = 0.3;
  std::vector<double> x = normal_values(n * d, rng), y = normal_values(m * d, rng);
  for (int64_t l = 0; l < d; ++l) {
    x[1 * d + l] *= 1e-15;  // |x_1| ~ 3e-15 < 1e-12
    y[2 * d + l] = 0;
  }
  const std::vector<double> w = normal_values(n * m, rng);  // L = sum W_ij S_ij, so G = W
  const std::vector<T> x_t = cast<T>(x), y_t = cast<T>(y);
  const std::vector<T> s = forward(x_t, y_t, n, m, d, T(t));
  const std::vector<double> want = direct_cosines(x, y, n, m, d, t);
  bool ok = true;
  for (int64_t e = 0; e < n * m; ++e) ok = ok && std::abs(s[e] - want[e]) <= 4 * tol * (1 + std::abs(want[e]));
  check(ok, "forward matches the normalised rows " + type);
  check(s[2] == T(0) && s[m + 2] == T(0), "zero row of y scores 0 " + type);

  std::vector<T> grad_x, grad_y;
  backward(cast<T>(w), x_t, y_t, n, m, d, T(t), grad_x, grad_y);
  auto loss = [&](const std::vector<double>& xs, const std::vector<double>& ys) {
    const std::vector<double> sv = direct_cosines(xs, ys, n, m, d, t);
    double sum = 0;
    for (int64_t e = 0; e < n * m; ++e) sum += w[e] * sv[e];
    return sum;
  };
  // Finite differences with a step relative to the row's size (the clamped row is linear in its entries).
  auto finite_difference = [&](bool of_x, int64_t row, int64_t l) {
    std::vector<double> xs = x, ys = y;
    std::vector<double>& v = of_x ? xs : ys;
    double scale = 0;
    for (int64_t c = 0; c < d; ++c) scale = std::max(scale, std::abs(v[row * d + c]));
    const double step = 1e-6 * (scale > 0 ? scale : 1e-12);
    v[row * d + l] += step;
    const double up = loss(xs, ys);
    v[row * d + l] -= 2 * step;
    return (up - loss(xs, ys)) / (2 * step);
  };
  const double grad_tol = sizeof(T) == 8 ? 1e-6 : 1e-3;
  bool ok_x = true, ok_y = true;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t l = 0; l < d; ++l) {
      const double fd = finite_difference(true, i, l), got = grad_x[i * d + l];
      ok_x = ok_x && std::abs(got - fd) <= grad_tol * (1 + std::abs(fd));
    }
  for (int64_t j = 0; j < m; ++j) {
    if (j == 2) continue;  // zero row: the norm is not differentiable there (checked below)
    for (int64_t l = 0; l < d; ++l) {
      const double fd = finite_difference(false, j, l), got = grad_y[j * d + l];
      ok_y = ok_y && std::abs(got - fd) <= grad_tol * (1 + std::abs(fd));
    }
  }
  check(ok_x, "grad x matches finite differences (clamped row included) " + type);
  check(ok_y, "grad y matches finite differences " + type);
  // Zero row of y: a_j is 1e12 (constant), so its gradient is the unprojected sum_i H_ij x_i.
  bool ok_zero = true;
  for (int64_t l = 0; l < d; ++l) {
    double want_l = 0;
    for (int64_t i = 0; i < n; ++i) {
      double norm = 0;
      for (int64_t c = 0; c < d; ++c) norm += x[i * d + c] * x[i * d + c];
      want_l += w[i * m + 2] / std::max(std::sqrt(norm), 1e-12) * 1e12 / t * x[i * d + l];
    }
    ok_zero = ok_zero && std::abs(grad_y[2 * d + l] - want_l) <= grad_tol * (1 + std::abs(want_l));
  }
  check(ok_zero, "zero row gradient has no Jacobian term " + type);
}

}  // namespace

int main() {
  run_all<float>("float");
  run_all<double>("double");
  return s2dc_test::report();
}

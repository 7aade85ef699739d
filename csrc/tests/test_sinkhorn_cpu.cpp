// Unit tests of the fused CPU Sinkhorn (csrc/cpu/sinkhorn.cpp): it must match a naive double-precision loop
// written straight from the definition, forward and backward, in float and double, on small odd shapes with
// zero-mass rows/columns, the tol stop, and the inputs that take its guarded paths; the naive backward itself is
// checked against finite differences, and fast_exp2 / fast_log2 against std::exp2 / std::log2. The Sinkhorn-Knopp
// half-steps and plan match their naive loop on ragged column chunks, single rows and columns, and logits of +-400
// at eps 0.04, and give infinite (never NaN) potentials from infinite ones.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cpu/vector_math.h"
#include "cpu/sinkhorn.h"

namespace {

using Vec = std::vector<double>;

constexpr double kInf = std::numeric_limits<double>::infinity();

int failures = 0;

struct Case {
  std::string name;
  int64_t n, m;
  double eps;
  int64_t n_iters;
  Vec cost, log_a, log_b;
};

// Random cost in [0, 1) and random positive marginals normalised to 1; `dead_rows` / `dead_cols` get zero mass.
Case make_case(std::string name, int64_t n, int64_t m, double eps, int64_t n_iters, std::vector<int64_t> dead_rows,
               std::vector<int64_t> dead_cols, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  Case c{std::move(name), n, m, eps, n_iters, Vec(n * m), Vec(n), Vec(m)};
  for (double& x : c.cost) x = uniform(rng);
  auto log_marginal = [&](Vec& log_w, const std::vector<int64_t>& dead) {
    Vec w(log_w.size());
    for (double& x : w) x = 0.2 + uniform(rng);
    for (int64_t k : dead) w[k] = 0.0;
    double total = 0.0;
    for (double x : w) total += x;
    for (size_t k = 0; k < w.size(); ++k) log_w[k] = w[k] == 0.0 ? -kInf : std::log(w[k] / total);
  };
  log_marginal(c.log_a, dead_rows);
  log_marginal(c.log_b, dead_cols);
  return c;
}

// torch.logsumexp: shifted by the max, or by 0 where the max is infinite.
double logsumexp(const Vec& x) {
  double max = -kInf;
  for (double v : x) max = std::max(max, v);
  if (std::isinf(max)) max = 0.0;
  double sum = 0.0;
  for (double v : x) sum += std::exp(v - max);
  return max + std::log(sum);
}

struct Forward {
  Vec f, g, f_hist, g_hist;
  int64_t done = 0;
  Vec errors;  // errors[t - 2]: the row-marginal error of iterate t - 1, checked at iteration t >= 2
};

// The loop of the definition, in double, with explicit divisions by eps.
Forward naive_forward(const Case& c, double tol) {
  const int64_t n = c.n, m = c.m;
  Forward out{Vec(n, 0.0), Vec(m, 0.0), Vec(c.n_iters * n), Vec(c.n_iters * m)};
  Vec x;
  for (int64_t t = 1; t <= c.n_iters; ++t) {
    Vec lse(n);
    for (int64_t i = 0; i < n; ++i) {
      x.assign(m, 0.0);
      for (int64_t j = 0; j < m; ++j) x[j] = (out.g[j] - c.cost[i * m + j]) / c.eps;
      lse[i] = logsumexp(x);
    }
    if (t > 1) {
      double err = 0.0;
      for (int64_t i = 0; i < n; ++i) err += std::abs(std::exp(out.f[i] / c.eps + lse[i]) - std::exp(c.log_a[i]));
      out.errors.push_back(err);
      if (tol > 0 && err < tol) break;
    }
    for (int64_t i = 0; i < n; ++i) out.f[i] = c.eps * (c.log_a[i] - lse[i]);
    for (int64_t j = 0; j < m; ++j) {
      x.assign(n, 0.0);
      for (int64_t i = 0; i < n; ++i) x[i] = (out.f[i] - c.cost[i * m + j]) / c.eps;
      out.g[j] = c.eps * (c.log_b[j] - logsumexp(x));
    }
    out.done = t;
    std::copy(out.f.begin(), out.f.end(), out.f_hist.begin() + (t - 1) * n);
    std::copy(out.g.begin(), out.g.end(), out.g_hist.begin() + (t - 1) * m);
  }
  return out;
}

struct Grads {
  Vec cost, log_a, log_b;
};

// Reverse-mode differentiation of naive_forward, one term at a time:
//   g^t_j = eps log_b_j - eps LSE_i((f^t_i - C_ij)/eps):  dg_j/dC_ij = Pc_ij, dg_j/df_i = -Pc_ij, dg_j/dlog_b_j = eps
//   f^t_i = eps log_a_i - eps LSE_j((g^(t-1)_j - C_ij)/eps): df_i/dC_ij = Pr_ij, df_i/dg_j = -Pr_ij, df_i/dlog_a_i = eps
// with Pc_ij = exp((f^t_i + g^t_j - C_ij)/eps - log_b_j), Pr_ij = exp((f^t_i + g^(t-1)_j - C_ij)/eps - log_a_i).
Grads naive_backward(const Case& c, const Forward& fw, const Vec& grad_f, const Vec& grad_g) {
  const int64_t n = c.n, m = c.m;
  Grads out{Vec(n * m, 0.0), Vec(n, 0.0), Vec(m, 0.0)};
  Vec F = grad_f, G = grad_g;
  for (int64_t t = fw.done; t >= 1; --t) {
    const double* f = fw.f_hist.data() + (t - 1) * n;
    const double* g = fw.g_hist.data() + (t - 1) * m;
    Vec g_prev(m, 0.0);
    if (t > 1) std::copy(fw.g_hist.data() + (t - 2) * m, fw.g_hist.data() + (t - 1) * m, g_prev.begin());
    for (int64_t j = 0; j < m; ++j) out.log_b[j] += c.eps * G[j];
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < m; ++j) {
        if (c.log_a[i] == -kInf || c.log_b[j] == -kInf) continue;  // Pc_ij = 0
        const double pc = std::exp((f[i] + g[j] - c.cost[i * m + j]) / c.eps - c.log_b[j]);
        out.cost[i * m + j] += G[j] * pc;
        F[i] -= G[j] * pc;
      }
      out.log_a[i] += c.eps * F[i];
    }
    Vec G_prev(m, 0.0);
    for (int64_t i = 0; i < n; ++i) {
      if (c.log_a[i] == -kInf) continue;  // Pr_ij = 0
      for (int64_t j = 0; j < m; ++j) {
        const double pr = std::exp((f[i] + g_prev[j] - c.cost[i * m + j]) / c.eps - c.log_a[i]);
        out.cost[i * m + j] += F[i] * pr;
        G_prev[j] -= F[i] * pr;
      }
    }
    G = G_prev;
    std::fill(F.begin(), F.end(), 0.0);
  }
  return out;
}

// Random adjoints for L = sum_i grad_f_i f_i + sum_j grad_g_j g_j; zero on zero-mass entries (f, g = -inf there).
void make_adjoints(const Case& c, uint64_t seed, Vec& grad_f, Vec& grad_g) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> uniform(-1.0, 1.0);
  grad_f.resize(c.n);
  grad_g.resize(c.m);
  for (int64_t i = 0; i < c.n; ++i) grad_f[i] = c.log_a[i] == -kInf ? 0.0 : uniform(rng);
  for (int64_t j = 0; j < c.m; ++j) grad_g[j] = c.log_b[j] == -kInf ? 0.0 : uniform(rng);
}

double loss(const Forward& fw, const Vec& grad_f, const Vec& grad_g) {
  double l = 0.0;
  for (size_t i = 0; i < grad_f.size(); ++i) l += grad_f[i] == 0.0 ? 0.0 : grad_f[i] * fw.f[i];
  for (size_t j = 0; j < grad_g.size(); ++j) l += grad_g[j] == 0.0 ? 0.0 : grad_g[j] * fw.g[j];
  return l;
}

// max_k |got_k - want_k| / (atol + rtol |want_k|) must be <= 1 (equal infinities match).
void expect_close(const std::string& what, const Vec& got, const Vec& want, double rtol, double atol) {
  double worst = 0.0;
  size_t worst_at = 0;
  for (size_t k = 0; k < want.size(); ++k) {
    const double ratio = got[k] == want[k] ? 0.0 : std::abs(got[k] - want[k]) / (atol + rtol * std::abs(want[k]));
    if (!(ratio <= worst)) {  // also catches NaN
      worst = ratio;
      worst_at = k;
    }
  }
  if (worst <= 1.0) return;
  std::printf("FAIL %s: element %zu is %.17g, want %.17g (error / tolerance = %.3g)\n", what.c_str(), worst_at,
              got[worst_at], want[worst_at], worst);
  ++failures;
}

void expect(bool condition, const std::string& what) {
  if (!condition) std::printf("FAIL %s\n", what.c_str());
  failures += !condition;
}

// The backward of the naive loop against central differences of its forward (no tol).
void test_naive_backward_is_the_gradient(const Case& c) {
  Vec grad_f, grad_g;
  make_adjoints(c, 7, grad_f, grad_g);
  const Grads grads = naive_backward(c, naive_forward(c, 0.0), grad_f, grad_g);
  Case probe = c;
  const double h = 1e-6;
  auto central_difference = [&](double& x) {  // x: an input of probe
    const double x0 = x;
    x = x0 + h;
    const double up = loss(naive_forward(probe, 0.0), grad_f, grad_g);
    x = x0 - h;
    const double down = loss(naive_forward(probe, 0.0), grad_f, grad_g);
    x = x0;
    return (up - down) / (2 * h);
  };
  Vec fd_cost(c.n * c.m), fd_log_a(c.n, 0.0), fd_log_b(c.m, 0.0), want_log_a = grads.log_a, want_log_b = grads.log_b;
  for (int64_t k = 0; k < c.n * c.m; ++k) fd_cost[k] = central_difference(probe.cost[k]);
  for (int64_t i = 0; i < c.n; ++i) {
    if (c.log_a[i] == -kInf) want_log_a[i] = 0.0;  // no finite difference at -inf
    else fd_log_a[i] = central_difference(probe.log_a[i]);
  }
  for (int64_t j = 0; j < c.m; ++j) {
    if (c.log_b[j] == -kInf) want_log_b[j] = 0.0;
    else fd_log_b[j] = central_difference(probe.log_b[j]);
  }
  const std::string name = c.name + " naive backward vs finite differences: ";
  expect_close(name + "grad_cost", fd_cost, grads.cost, 1e-5, 1e-7);
  expect_close(name + "grad_log_a", fd_log_a, want_log_a, 1e-5, 1e-7);
  expect_close(name + "grad_log_b", fd_log_b, want_log_b, 1e-5, 1e-7);
}

template <typename T>
std::vector<T> cast(const Vec& x) {
  return std::vector<T>(x.begin(), x.end());
}

template <typename T>
Vec widen(const std::vector<T>& x) {
  return Vec(x.begin(), x.end());
}

// The kernel in precision T against the naive loop: iterates, n_done, and all three gradients.
template <typename T>
void test_kernel_matches_naive(const Case& c, double tol, double rtol, double atol) {
  const Forward want = naive_forward(c, tol);
  const std::vector<T> cost = cast<T>(c.cost), log_a = cast<T>(c.log_a), log_b = cast<T>(c.log_b);
  const s2dc::cpu::SinkhornProblem<T> problem{cost.data(), log_a.data(), log_b.data(), c.n, c.m, T(c.eps)};
  std::vector<T> f(c.n), g(c.m), f_hist(c.n_iters * c.n), g_hist(c.n_iters * c.m);
  const int64_t done =
      s2dc::cpu::sinkhorn_forward(problem, c.n_iters, T(tol), f.data(), g.data(), f_hist.data(), g_hist.data());
  const std::string name = c.name + (sizeof(T) == 4 ? " float: " : " double: ");
  expect(done == want.done, name + "n_done " + std::to_string(done) + " != " + std::to_string(want.done));
  if (done != want.done) return;
  expect_close(name + "f", widen(f), want.f, rtol, atol);
  expect_close(name + "g", widen(g), want.g, rtol, atol);
  f_hist.resize(done * c.n);
  g_hist.resize(done * c.m);
  expect_close(name + "f_hist", widen(f_hist), Vec(want.f_hist.begin(), want.f_hist.begin() + done * c.n), rtol, atol);
  expect_close(name + "g_hist", widen(g_hist), Vec(want.g_hist.begin(), want.g_hist.begin() + done * c.m), rtol, atol);

  Vec grad_f, grad_g;
  make_adjoints(c, 11, grad_f, grad_g);
  const Grads want_grads = naive_backward(c, want, grad_f, grad_g);
  const std::vector<T> grad_f_t = cast<T>(grad_f), grad_g_t = cast<T>(grad_g);
  std::vector<T> grad_cost(c.n * c.m, T(-1)), grad_log_a(c.n, T(-1)), grad_log_b(c.m, T(-1));  // overwritten
  s2dc::cpu::sinkhorn_backward(problem, f_hist.data(), g_hist.data(), done, grad_f_t.data(), grad_g_t.data(),
                               grad_cost.data(), grad_log_a.data(), grad_log_b.data());
  expect_close(name + "grad_cost", widen(grad_cost), want_grads.cost, rtol, atol);
  expect_close(name + "grad_log_a", widen(grad_log_a), want_grads.log_a, rtol, atol);
  expect_close(name + "grad_log_b", widen(grad_log_b), want_grads.log_b, rtol, atol);
}

void test_kernel_matches_naive_all(const Case& c, double tol) {
  test_kernel_matches_naive<double>(c, tol, 1e-10, 1e-12);
  test_kernel_matches_naive<float>(c, tol, 2e-4, 2e-5);
}

// Many iterations in float: rounding must not accumulate from one iteration to the next. The plain float loop
// keeps f and g within ~5e-7 of the exact ones here (relative to their largest entry), including their common level
// (f + c, g - c), which the plan does not fix and the iterations do not restore; an accumulating kernel is off by
// ~1e-5 after 200 iterations. (The kernel's row sums are split over SIMD lanes: this holds for its -O3 build.)
void test_float_does_not_drift(const Case& c) {
  const Forward want = naive_forward(c, 0.0);
  const std::vector<float> cost = cast<float>(c.cost), log_a = cast<float>(c.log_a), log_b = cast<float>(c.log_b);
  const s2dc::cpu::SinkhornProblem<float> problem{cost.data(), log_a.data(), log_b.data(), c.n, c.m, float(c.eps)};
  std::vector<float> f(c.n), g(c.m), f_hist(c.n_iters * c.n), g_hist(c.n_iters * c.m);
  s2dc::cpu::sinkhorn_forward(problem, c.n_iters, 0.0f, f.data(), g.data(), f_hist.data(), g_hist.data());
  auto largest = [](const Vec& x) {
    double big = 0.0;
    for (double v : x) big = std::max(big, std::abs(v));
    return big;
  };
  expect_close(c.name + " float f", widen(f), want.f, 0.0, 2e-6 * largest(want.f));
  expect_close(c.name + " float g", widen(g), want.g, 0.0, 2e-6 * largest(want.g));
}

// A tol halfway (geometrically) between two successive marginal errors stops the loop at a known iteration,
// with a wide margin for float rounding.
double tol_stopping_near(const Case& c, int64_t iteration) {
  const Forward run = naive_forward(c, 0.0);
  const double before = run.errors.at(iteration - 2), after = run.errors.at(iteration - 1);
  expect(after < 0.5 * before, c.name + ": the marginal error must fall fast enough for a robust tol");
  return std::sqrt(before * after);
}

// Tracks the worst error of a function in units of the last place of the exact result (plus `floor`, an absolute
// allowance), and reports it when it exceeds 1.5.
template <typename T>
struct UlpCheck {
  std::string name;
  long double floor = 0;
  double worst = 0.0;
  T worst_x = 0;

  void add(T x, long double got, long double want) {
    const T want_t = static_cast<T>(want);
    const long double ulp = std::nextafter(want_t, std::numeric_limits<T>::infinity()) - want_t;
    const double err = static_cast<double>(std::abs(got - want) / (ulp + floor));
    if (!(err <= worst)) {
      worst = err;
      worst_x = x;
    }
  }

  void report() const {
    if (!(worst < 1.5)) {
      std::printf("FAIL %s: %.3g ulp at x = %.9g\n", name.c_str(), worst, double(worst_x));
      ++failures;
    }
  }
};

// fast_exp2 against std::exp2 in long double: within 1.5 ulp over its range (about 1 with FMA), exact powers of
// two, the special values.
template <typename T>
void test_fast_exp2() {
  using E = s2dc::cpu::Exp2Traits<T>;
  const std::string name = sizeof(T) == 4 ? "fast_exp2<float>" : "fast_exp2<double>";
  const int64_t samples = 1 << 20;
  UlpCheck<T> check{name};
  for (int64_t k = 0; k <= samples; ++k) {
    const T x = T(E::kMinExponent + (127.0 - E::kMinExponent) * double(k) / samples);
    check.add(x, s2dc::cpu::fast_exp2(x), std::exp2(static_cast<long double>(x)));
  }
  check.report();
  const T inf = std::numeric_limits<T>::infinity();
  for (int k = -120; k <= 120; ++k) expect(s2dc::cpu::fast_exp2(T(k)) == std::ldexp(T(1), k), name + ": 2^k exact");
  expect(s2dc::cpu::fast_exp2(-inf) == T(0), name + ": exp2(-inf) = 0");
  expect(s2dc::cpu::fast_exp2(E::kMinExponent - T(0.5)) == T(0), name + ": 0 below kMinExponent");
  expect(s2dc::cpu::fast_exp2(inf) == inf, name + ": exp2(inf) = inf");
  expect(std::isnan(s2dc::cpu::fast_exp2(std::numeric_limits<T>::quiet_NaN())), name + ": exp2(NaN) = NaN");
}

// fast_log2 against std::log2 in long double: within 1.5 ulp (plus an absolute 1 ulp of 1/2 near x = 1, where the
// result is tiny) from the smallest subnormal to the largest float, exact powers of two, the special values.
template <typename T>
void test_fast_log2() {
  const std::string name = sizeof(T) == 4 ? "fast_log2<float>" : "fast_log2<double>";
  const int64_t samples = 1 << 20;
  const double lo = std::log2(double(std::numeric_limits<T>::denorm_min()));
  const double hi = std::log2(double(std::numeric_limits<T>::max()));
  UlpCheck<T> check{name, std::numeric_limits<T>::epsilon() / 4};
  for (int64_t k = 0; k <= samples; ++k) {
    // Log-uniform over the whole range, plus a dense sweep of [1/2, 2] where the series does its work.
    const double t = double(k) / samples;
    for (const T x : {T(std::exp2(lo + (hi - lo) * t)), T(0.5 + 1.5 * t)}) {
      check.add(x, s2dc::cpu::fast_log2(x), std::log2(static_cast<long double>(x)));
    }
  }
  check.report();
  const T inf = std::numeric_limits<T>::infinity();
  for (int k = -140; k <= 120; ++k) expect(s2dc::cpu::fast_log2(std::ldexp(T(1), k)) == T(k), name + ": log2 2^k exact");
  expect(s2dc::cpu::fast_log2(T(0)) == -inf, name + ": log2(0) = -inf");
  expect(s2dc::cpu::fast_log2(inf) == inf, name + ": log2(inf) = inf");
  expect(std::isnan(s2dc::cpu::fast_log2(T(-1))), name + ": log2(-1) = NaN");
  expect(std::isnan(s2dc::cpu::fast_log2(std::numeric_limits<T>::quiet_NaN())), name + ": log2(NaN) = NaN");
}

// ---------------------------------------------------------------- Sinkhorn-Knopp on logits
struct Knopp {
  Vec p, q, Q;
};

// The Sinkhorn-Knopp loop of sinkhorn.h in double, straight from its definition (base 2, x_ik = s L_ik).
Knopp naive_knopp(const Vec& logits, int64_t B, int64_t K, double eps, int64_t n_iters) {
  const double scale = 1.4426950408889634 / eps;
  Knopp out{Vec(B, 0.0), Vec(K), Vec(B * K)};
  Vec terms;
  const double ln2 = std::log(2.0);
  for (int64_t t = 1; t <= n_iters; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      terms.assign(B, 0.0);
      for (int64_t i = 0; i < B; ++i) terms[i] = ln2 * (out.p[i] + scale * logits[i * K + k]);
      out.q[k] = -std::log2(double(K)) - logsumexp(terms) / ln2;
    }
    for (int64_t i = 0; i < B; ++i) {
      terms.assign(K, 0.0);
      for (int64_t k = 0; k < K; ++k) terms[k] = ln2 * (out.q[k] + scale * logits[i * K + k]);
      out.p[i] = -std::log2(double(B)) - logsumexp(terms) / ln2;
    }
  }
  for (int64_t i = 0; i < B; ++i) {
    for (int64_t k = 0; k < K; ++k) {
      out.Q[i * K + k] = std::exp2(out.p[i] + out.q[k] + scale * logits[i * K + k] + std::log2(double(B)));
    }
  }
  return out;
}

// The three Sinkhorn-Knopp kernels in precision T against naive_knopp on the same (rounded to T) logits, uniform
// in [-amplitude, amplitude], each half-step split into ranges as a parallel caller would split it (`col_split` columns,
// not a multiple of the chunk, and `row_split` rows per call). Potentials within rtol of their scale (the
// largest |x_ik|: the rounding of x_ik in T is relative to it), Q within rtol relative to that too (or below the
// smallest normal exponent of fast_exp2, where it flushes to 0) and rows of Q summing to 1.
template <typename T>
void test_knopp_matches_naive(const std::string& name, int64_t B, int64_t K, double amplitude, double eps,
                              int64_t n_iters, int64_t col_split, int64_t row_split, double rtol, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> uniform(-amplitude, amplitude);
  std::vector<T> logits(B * K);
  for (T& x : logits) x = T(uniform(rng));
  const Vec wide = widen(logits);
  const Knopp want = naive_knopp(wide, B, K, eps, n_iters);
  const T scale = T(1.4426950408889634 / eps);
  std::vector<T> p(B, T(0)), q(K, T(-1)), Q(B * K, T(-1));
  for (int64_t t = 1; t <= n_iters; ++t) {
    for (int64_t col = 0; col < K; col += col_split) {
      s2dc::cpu::knopp_column_update(logits.data(), B, K, scale, p.data(), q.data(), col, std::min(K, col + col_split));
    }
    for (int64_t row = 0; row < B; row += row_split) {
      s2dc::cpu::knopp_row_update(logits.data(), B, K, scale, q.data(), p.data(), row, std::min(B, row + row_split));
    }
  }
  for (int64_t row = 0; row < B; row += row_split) {
    s2dc::cpu::knopp_plan(logits.data(), B, K, scale, p.data(), q.data(), Q.data(), row, std::min(B, row + row_split));
  }
  double x_max = 1.0;
  for (double x : wide) x_max = std::max(x_max, std::abs(x) / eps * 1.4426950408889634);
  const std::string full = "knopp " + name + (sizeof(T) == 4 ? " float: " : " double: ");
  expect_close(full + "p", widen(p), want.p, 0.0, rtol * x_max);
  expect_close(full + "q", widen(q), want.q, 0.0, rtol * x_max);
  const double smallest = std::exp2(double(s2dc::cpu::Exp2Traits<T>::kMinExponent));
  expect_close(full + "Q", widen(Q), want.Q, rtol * x_max, smallest);
  Vec row_sums(B, 0.0);
  for (int64_t i = 0; i < B; ++i) {
    for (int64_t k = 0; k < K; ++k) row_sums[i] += double(Q[i * K + k]);
  }
  expect_close(full + "rows of Q sum to 1", row_sums, Vec(B, 1.0), 0.0, rtol * x_max);
}

// Infinite log-sum-exps: every term -inf gives -inf, a +inf term +inf, never NaN.
template <typename T>
void test_knopp_infinite_terms() {
  const std::string name = sizeof(T) == 4 ? "knopp float: " : "knopp double: ";
  const T inf = std::numeric_limits<T>::infinity();
  const int64_t B = 3, K = 600;  // two column chunks in float, three in double
  const std::vector<T> logits(B * K, T(0.5));
  std::vector<T> p(B, -inf), q(K, T(0));
  s2dc::cpu::knopp_column_update(logits.data(), B, K, T(1), p.data(), q.data(), 0, K);
  expect(std::all_of(q.begin(), q.end(), [&](T v) { return v == inf; }), name + "no mass in any row: q = +inf");
  p[1] = inf;
  s2dc::cpu::knopp_column_update(logits.data(), B, K, T(1), p.data(), q.data(), 0, K);
  expect(std::all_of(q.begin(), q.end(), [&](T v) { return v == -inf; }), name + "a row p = +inf: q = -inf");
  std::fill(q.begin(), q.end(), -inf);
  s2dc::cpu::knopp_row_update(logits.data(), B, K, T(1), q.data(), p.data(), 0, B);
  expect(std::all_of(p.begin(), p.end(), [&](T v) { return v == inf; }), name + "no mass in any column: p = +inf");
  q[K - 1] = inf;
  s2dc::cpu::knopp_row_update(logits.data(), B, K, T(1), q.data(), p.data(), 0, B);
  expect(std::all_of(p.begin(), p.end(), [&](T v) { return v == -inf; }), name + "a column q = +inf: p = -inf");
}

void test_knopp_all() {
  for (const int64_t rows : {int64_t(1), int64_t(5)}) {
    test_knopp_matches_naive<double>("37x1000", 37, 1000, 3.0, 0.1, 3, 700, rows, 1e-14, 21);
    test_knopp_matches_naive<float>("37x1000", 37, 1000, 3.0, 0.1, 3, 700, rows, 1e-6, 21);
  }
  // Ragged chunks and row blocks: 1 row, 1 column, a row of 2500 columns (1024-column blocks), 40 rows.
  test_knopp_matches_naive<double>("1x2500", 1, 2500, 2.0, 0.05, 4, 2500, 1, 1e-14, 22);
  test_knopp_matches_naive<float>("1x2500", 1, 2500, 2.0, 0.05, 4, 2500, 1, 1e-6, 22);
  test_knopp_matches_naive<double>("40x1", 40, 1, 1.0, 0.5, 2, 1, 3, 1e-14, 23);
  test_knopp_matches_naive<float>("40x1", 40, 1, 1.0, 0.5, 2, 1, 3, 1e-6, 23);
  test_knopp_matches_naive<double>("1x1", 1, 1, 1.0, 0.5, 1, 1, 1, 1e-14, 24);
  test_knopp_matches_naive<float>("1x1", 1, 1, 1.0, 0.5, 1, 1, 1, 1e-6, 24);
  // Teacher temperature with logits of +-400 (x ~ 1e4 bits; exp of them overflows in any precision): finite,
  // the float Q off by rounding of x_ik (1e-3 relative to the largest entries).
  test_knopp_matches_naive<double>("19x300 logits +-400 eps 0.04", 19, 300, 400.0, 0.04, 3, 300, 2, 1e-14, 25);
  test_knopp_matches_naive<float>("19x300 logits +-400 eps 0.04", 19, 300, 400.0, 0.04, 3, 300, 2, 1e-6, 25);
  test_knopp_infinite_terms<float>();
  test_knopp_infinite_terms<double>();
}

}  // namespace

int main() {
  test_fast_exp2<float>();
  test_fast_exp2<double>();
  test_fast_log2<float>();
  test_fast_log2<double>();

  const std::vector<Case> cases = {
      make_case("7x5", 7, 5, 0.3, 20, {}, {}, 1),
      make_case("1x13", 1, 13, 0.1, 9, {}, {}, 2),
      make_case("13x1", 13, 1, 0.2, 6, {}, {}, 3),
      make_case("6x9 zero-mass row and column", 6, 9, 0.5, 15, {2}, {4}, 4),
      make_case("5x7 small eps", 5, 7, 0.02, 30, {}, {0, 6}, 5),
      make_case("70x150 blocks", 70, 150, 0.1, 8, {3, 69}, {0, 77, 149}, 6),
  };
  for (const Case& c : cases) {
    if (c.n * c.m <= 100) test_naive_backward_is_the_gradient(c);
    test_kernel_matches_naive_all(c, 0.0);
  }
  Case converging = make_case("9x11 tol", 9, 11, 0.5, 100, {1}, {3}, 8);
  test_kernel_matches_naive_all(converging, tol_stopping_near(converging, 6));
  Case one_step = make_case("4x3 tol stops at 1", 4, 3, 1.0, 10, {}, {}, 9);
  test_kernel_matches_naive_all(one_step, 10.0);  // every error is below 10: stops at t = 2, n_done = 1
  test_kernel_matches_naive_all(make_case("0x4 empty", 0, 4, 0.1, 3, {}, {}, 10), 0.0);
  // A column far costlier than every row's best: its weights underflow at t = 1, so the column half-step
  // recomputes it with its own max shift (+2.5 / eps = 180 bits suffices in float, double needs +25).
  for (const double extra : {2.5, 25.0}) {
    Case outlier = make_case("6x7 outlier column +" + std::to_string(extra), 6, 7, 0.02, 12, {}, {}, 12);
    for (int64_t i = 0; i < outlier.n; ++i) outlier.cost[i * outlier.m + 3] += extra;
    test_kernel_matches_naive<double>(outlier, 0.0, 1e-10, 1e-12);
    if (extra < 10) test_kernel_matches_naive<float>(outlier, 0.0, 2e-4, 2e-5);
  }
  // A row mass below float's underflow threshold (its Pc underflow): the float backward evaluates Pr directly.
  Case tiny_mass = make_case("5x6 tiny row mass", 5, 6, 0.2, 10, {}, {1}, 13);
  tiny_mass.log_a[2] = std::log(1e-40);
  test_kernel_matches_naive_all(tiny_mass, 0.0);
  test_float_does_not_drift(make_case("150x120 200 iterations", 150, 120, 0.05, 200, {}, {}, 14));
  // No mass at all: f = -inf, g = +inf, with no NaN anywhere.
  test_kernel_matches_naive_all(make_case("3x4 zero mass", 3, 4, 0.1, 3, {0, 1, 2}, {}, 11), 0.0);
  test_knopp_all();

  if (failures) std::printf("%d check(s) failed\n", failures);
  else std::printf("all checks passed\n");
  return failures ? 1 : 0;
}

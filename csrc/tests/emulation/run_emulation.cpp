// Runs csrc/cuda/sinkhorn.cu's launchers on the CPU emulation (cuda_emulation.h; built by run.sh) and compares
// every output with the CPU kernels of csrc/cpu/sinkhorn.h on random problems: odd shapes, zero-mass rows and
// columns, tol = 0 and tol > 0 (per-problem stops), per-problem n_done in the backward, and the three shared-memory
// layouts of the launchers (C and vectors in shared memory, vectors only, nothing: workspace), chosen by setting the
// emulated device's opt-in limit. Arrays are compared by max_k |got_k - want_k| / max_k |want_k| (infinities must
// match exactly, NaN fails) against 1e-5 (float) / 1e-10 (double); the scale is at least 1e-2 (C is U[0, 1), so
// potentials and gradients are O(1): a potential that is 0 but for rounding, as g when M = 1, is not compared to its
// rounding noise). Prints FAIL lines; exit status 1 on failure.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cpu/sinkhorn.h"
#include "cuda/sinkhorn.h"

namespace {

int failures = 0;

enum class Memory { kCostInShared, kVectorsInShared, kGlobal };
const char* memory_name(Memory m) {
  return m == Memory::kCostInShared ? "C+vectors in shared" : m == Memory::kVectorsInShared ? "vectors in shared" : "global+workspace";
}

struct Case {
  int64_t B, N, M, n_iters;
  double eps, tol;
  bool zero_mass;
  Memory memory;
  int64_t last_n_done = -1;  // >= 0: the backward's n_done of the last problem, capped by the forward's
};

template <typename T>
constexpr T kInf = std::numeric_limits<T>::infinity();

// max |got - want| / max(max |want|, 1e-2) over the first count entries; infinities must match, NaN fails.
template <typename T>
double compare(const std::string& what, const T* got, const T* want, int64_t count, double limit) {
  double worst = 0.0, scale = 1e-2;
  int64_t worst_at = -1;
  bool mismatch = false;
  for (int64_t k = 0; k < count; ++k) {
    if (std::isfinite(want[k])) scale = std::max(scale, std::abs(double(want[k])));
  }
  for (int64_t k = 0; k < count; ++k) {
    const bool both_finite = std::isfinite(got[k]) && std::isfinite(want[k]);
    if (!both_finite) {
      if (!(got[k] == want[k]) && !mismatch) {
        mismatch = true;
        worst_at = k;
      }
      continue;
    }
    const double error = std::abs(double(got[k]) - double(want[k])) / scale;
    if (error > worst) {
      worst = error;
      if (!mismatch) worst_at = k;
    }
  }
  if (mismatch || !(worst <= limit)) {
    std::printf("FAIL %s: %s (limit %.1g), element %lld is %.17g, want %.17g\n", what.c_str(),
                mismatch ? "non-finite mismatch" : ("relative error " + std::to_string(worst)).c_str(), limit,
                static_cast<long long>(worst_at),
                double(got[worst_at]), double(want[worst_at]));
    ++failures;
  }
  return mismatch ? kInf<double> : worst;
}

template <typename T>
void run_case(const Case& c, uint64_t seed) {
  const bool is_float = sizeof(T) == 4;
  const double limit = is_float ? 1e-5 : 1e-10;
  const int64_t B = c.B, N = c.N, M = c.M, n_iters = c.n_iters;
  const std::string name = std::string(is_float ? "float " : "double ") + std::to_string(B) + "x" +
                           std::to_string(N) + "x" + std::to_string(M) + " iters=" + std::to_string(n_iters) +
                           " tol=" + std::to_string(c.tol) + (c.zero_mass ? " zero-mass" : "") + " [" +
                           memory_name(c.memory) + "]" +
                           (c.last_n_done >= 0 ? " last n_done<=" + std::to_string(c.last_n_done) : "");
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  std::vector<T> C(B * N * M), log_a(B * N), log_b(B * M);
  for (auto& x : C) x = T(uniform(rng));
  const auto log_marginal = [&](T* x, int64_t n, int64_t dead) {
    double total = 0.0;
    std::vector<double> w(n);
    for (int64_t k = 0; k < n; ++k) total += (w[k] = k == dead ? 0.0 : 0.5 + uniform(rng));
    for (int64_t k = 0; k < n; ++k) x[k] = k == dead ? -kInf<T> : T(std::log(w[k] / total));
  };
  for (int64_t b = 0; b < B; ++b) {
    log_marginal(log_a.data() + b * N, N, c.zero_mass && N > 1 ? N / 2 : -1);
    log_marginal(log_b.data() + b * M, M, c.zero_mass && M > 1 ? M / 3 : -1);
  }
  const T eps = T(c.eps), tol = T(c.tol);

  emu::Device& dev = emu::device();
  const size_t vector_bytes = static_cast<size_t>(N + M) * sizeof(T);
  dev.optin_bytes = c.memory == Memory::kCostInShared   ? 232448
                    : c.memory == Memory::kVectorsInShared ? dev.static_shared_bytes + vector_bytes
                                                          : dev.static_shared_bytes + vector_bytes - 1;
  dev.max_dynamic.clear();  // a fresh device per case: the attribute opt-in happens again

  // Forward: outputs start as NaN so that a missing write shows.
  const T nan = std::numeric_limits<T>::quiet_NaN();
  std::vector<T> f(B * N, nan), g(B * M, nan), f_hist(B * n_iters * N, nan), g_hist(B * n_iters * M, nan);
  std::vector<int64_t> n_done(B, -7);
  cudaError_t err = s2dc::sinkhorn_forward_cuda<T>(C.data(), log_a.data(), log_b.data(), B, N, M, eps, n_iters, tol,
                                                   f.data(), g.data(), f_hist.data(), g_hist.data(), n_done.data(),
                                                   nullptr);
  if (err != cudaSuccess) {
    std::printf("FAIL %s: forward launcher returned %d\n", name.c_str(), int(err));
    ++failures;
    return;
  }
  double forward_error = 0.0;
  std::vector<int64_t> want_done(B);
  for (int64_t b = 0; b < B; ++b) {
    const s2dc::cpu::SinkhornProblem<T> problem{C.data() + b * N * M, log_a.data() + b * N, log_b.data() + b * M,
                                               N, M, eps};
    std::vector<T> wf(N), wg(M), wfh(n_iters * N), wgh(n_iters * M);
    want_done[b] = s2dc::cpu::sinkhorn_forward(problem, n_iters, tol, wf.data(), wg.data(), wfh.data(), wgh.data());
    const std::string at = name + " problem " + std::to_string(b) + " forward ";
    if (n_done[b] != want_done[b]) {
      std::printf("FAIL %sn_done: %lld, want %lld\n", at.c_str(), static_cast<long long>(n_done[b]),
                  static_cast<long long>(want_done[b]));
      ++failures;
      continue;
    }
    forward_error = std::max(forward_error, compare(at + "f", f.data() + b * N, wf.data(), N, limit));
    forward_error = std::max(forward_error, compare(at + "g", g.data() + b * M, wg.data(), M, limit));
    forward_error = std::max(forward_error, compare(at + "f_hist", f_hist.data() + b * n_iters * N, wfh.data(),
                                                    want_done[b] * N, limit));
    forward_error = std::max(forward_error, compare(at + "g_hist", g_hist.data() + b * n_iters * M, wgh.data(),
                                                    want_done[b] * M, limit));
  }

  // Backward of L = <grad_f, f> + <grad_g, g> (adjoints 0 on zero-mass entries, where f, g = -inf).
  std::uniform_real_distribution<double> signed_uniform(-1.0, 1.0);
  std::vector<T> grad_f(B * N), grad_g(B * M);
  for (int64_t k = 0; k < B * N; ++k) grad_f[k] = log_a[k] == -kInf<T> ? T(0) : T(signed_uniform(rng));
  for (int64_t k = 0; k < B * M; ++k) grad_g[k] = log_b[k] == -kInf<T> ? T(0) : T(signed_uniform(rng));
  std::vector<int64_t> backward_done = n_done;
  if (c.last_n_done >= 0) backward_done[B - 1] = std::min(backward_done[B - 1], c.last_n_done);
  std::vector<T> grad_C(B * N * M, nan), grad_log_a(B * N, nan), grad_log_b(B * M, nan);
  std::vector<T> workspace(s2dc::sinkhorn_backward_workspace_numel(B, N, M), nan);
  const auto backward = [&](T* ws) {
    return s2dc::sinkhorn_backward_cuda<T>(C.data(), log_a.data(), log_b.data(), f_hist.data(), g_hist.data(),
                                           backward_done.data(), grad_f.data(), grad_g.data(), B, N, M, eps, n_iters,
                                           grad_C.data(), grad_log_a.data(), grad_log_b.data(), ws, nullptr);
  };
  if (c.memory == Memory::kGlobal && backward(nullptr) != cudaErrorInvalidValue) {
    std::printf("FAIL %s: backward without the workspace it needs did not return cudaErrorInvalidValue\n",
                name.c_str());
    ++failures;
  }
  err = backward(c.memory == Memory::kGlobal ? workspace.data() : nullptr);
  if (err != cudaSuccess) {
    std::printf("FAIL %s: backward launcher returned %d\n", name.c_str(), int(err));
    ++failures;
    return;
  }
  double backward_error = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    const s2dc::cpu::SinkhornProblem<T> problem{C.data() + b * N * M, log_a.data() + b * N, log_b.data() + b * M,
                                               N, M, eps};
    std::vector<T> wC(N * M), wa(N), wb(M);
    s2dc::cpu::sinkhorn_backward(problem, f_hist.data() + b * n_iters * N, g_hist.data() + b * n_iters * M,
                                 backward_done[b], grad_f.data() + b * N, grad_g.data() + b * M, wC.data(),
                                 wa.data(), wb.data());
    const std::string at = name + " problem " + std::to_string(b) + " backward ";
    backward_error = std::max(backward_error, compare(at + "grad_C", grad_C.data() + b * N * M, wC.data(), N * M, limit));
    backward_error = std::max(backward_error, compare(at + "grad_log_a", grad_log_a.data() + b * N, wa.data(), N, limit));
    backward_error = std::max(backward_error, compare(at + "grad_log_b", grad_log_b.data() + b * M, wb.data(), M, limit));
  }
  std::string done;
  for (int64_t b = 0; b < B; ++b) done += (b ? "," : "") + std::to_string(n_done[b]);
  std::printf("%-78s n_done=%-8s fwd %.2e  bwd %.2e\n", name.c_str(), done.c_str(), forward_error, backward_error);
  std::fflush(stdout);
}

}  // namespace

// With --quick (the ThreadSanitizer run), only the cases with max(N, M) <= 64 (blocks of up to 512 threads).
int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  const Case cases[] = {
      {2, 7, 5, 4, 0.1, 0.0, false, Memory::kCostInShared},
      {2, 13, 1, 3, 0.2, 0.0, false, Memory::kCostInShared},
      {2, 1, 13, 3, 0.2, 0.0, false, Memory::kGlobal},
      {3, 6, 9, 5, 0.1, 0.0, true, Memory::kCostInShared, 2},
      {3, 6, 9, 40, 0.1, 1e-3, true, Memory::kVectorsInShared},
      {3, 6, 9, 40, 0.1, 1e-3, true, Memory::kGlobal, 0},
      {3, 33, 47, 30, 0.1, 1e-2, false, Memory::kVectorsInShared, 1},
      {2, 33, 47, 4, 0.05, 0.0, true, Memory::kGlobal},
      {2, 64, 65, 3, 0.1, 0.0, false, Memory::kGlobal},
      {2, 145, 145, 3, 0.1, 0.0, true, Memory::kCostInShared},
      {1, 9, 600, 2, 0.1, 0.0, false, Memory::kVectorsInShared},
      {2, 9, 300, 3, 0.1, 0.0, true, Memory::kCostInShared},
      {2, 40, 200, 3, 0.1, 0.0, false, Memory::kCostInShared},
  };
  uint64_t seed = 1;
  for (const Case& c : cases) {
    if (quick && std::max(c.N, c.M) > 64) continue;
    run_case<float>(c, seed);
    run_case<double>(c, seed++);
  }
  const int emulation_failures = emu::device().failures;
  std::printf("%d launches, %d comparison failure(s), %d emulation report(s)\n", emu::device().launches, failures,
              emulation_failures);
  return failures + emulation_failures > 0 ? 1 : 0;
}

// exp2 for vector loops: plain arithmetic that the compiler vectorises at any SIMD width (no library call), always
// inlined so that it is compiled for the instruction set of the loop that calls it.
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>

namespace s2dc::cpu {

template <typename T>
struct Exp2Traits;

template <>
struct Exp2Traits<float> {
  using Bits = uint32_t;
  static constexpr int kMantissaBits = 23;
  static constexpr Bits kExponentBias = 127;
  static constexpr int kDegree = 7;          // Taylor truncation error < 0.1 ulp on |r| <= 1/2
  static constexpr float kMinExponent = -125;  // below: 0 (keeps every nonzero result a normal number)
  static constexpr float kMaxExponent = 128;   // at and above: +inf
};

template <>
struct Exp2Traits<double> {
  using Bits = uint64_t;
  static constexpr int kMantissaBits = 52;
  static constexpr Bits kExponentBias = 1023;
  static constexpr int kDegree = 13;
  static constexpr double kMinExponent = -1021;
  static constexpr double kMaxExponent = 1024;
};

namespace detail {

constexpr double kLn2 = 0.693147180559945309417232121458176568;

// ln(2)^k / k!, the Taylor coefficients of 2^r = exp(r ln 2).
constexpr double exp2_taylor(int k) { return k == 0 ? 1.0 : exp2_taylor(k - 1) * kLn2 / k; }

template <typename T, int K, int Degree>
[[gnu::always_inline]] inline T exp2_polynomial(T r) {
  if constexpr (K == Degree) {
    return T(exp2_taylor(K));
  } else {
    return T(exp2_taylor(K)) + r * exp2_polynomial<T, K + 1, Degree>(r);
  }
}

}  // namespace detail

// 2^x = 2^k 2^r with k = round(x), r = x - k in [-1/2, 1/2]: 2^r from its Taylor polynomial, 2^k written into the
// exponent field. Adding 1.5 * 2^mantissa_bits rounds x to an integer held in the low mantissa bits, which the
// shift moves into the exponent field. About 1 ulp above kMinExponent; 0 below it (also -inf), +inf from about
// kMaxExponent - 1/2 (also +inf), NaN for NaN. Branch-free: vector loops if-convert the selects (needs
// -fno-trapping-math with GCC).
template <typename T>
[[gnu::always_inline]] inline T fast_exp2(T x) {
  using E = Exp2Traits<T>;
  using Bits = typename E::Bits;
  constexpr T kRound = T(Bits{3} << (E::kMantissaBits - 1));
  const T clamped = std::min(x, E::kMaxExponent);  // NaN stays NaN
  const T shifted = clamped + kRound;
  const T k = shifted - kRound;
  const T r = clamped - k;
  const Bits scale = (std::bit_cast<Bits>(shifted) + E::kExponentBias) << E::kMantissaBits;  // 2^k
  const T y = detail::exp2_polynomial<T, 0, E::kDegree>(r) * std::bit_cast<T>(scale);
  return x < E::kMinExponent ? T(0) : y;
}

}  // namespace s2dc::cpu

// exp2 and log2 for vector loops: plain arithmetic that the compiler vectorises at any SIMD width (no library
// call), always inlined so that they are compiled for the instruction set of the loop that calls them.
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace s2dc::cpu {

template <typename T>
struct Exp2Traits;

template <>
struct Exp2Traits<float> {
  using Bits = uint32_t;
  static constexpr int kMantissaBits = 23;
  static constexpr Bits kExponentBias = 127;
  static constexpr int kDegree = 7;          // Taylor truncation error < 0.1 ulp on |r| <= 1/2
  static constexpr int kLogTerms = 5;        // atanh series: truncation error < 0.1 ulp on |s| <= 0.172
  static constexpr float kMinExponent = -125;  // below: 0 (keeps every nonzero result a normal number)
  static constexpr float kMaxExponent = 128;   // at and above: +inf
};

template <>
struct Exp2Traits<double> {
  using Bits = uint64_t;
  static constexpr int kMantissaBits = 52;
  static constexpr Bits kExponentBias = 1023;
  static constexpr int kDegree = 13;
  static constexpr int kLogTerms = 11;
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

// 2 log2(e) / (2k + 1), the coefficients of log2((1 + s) / (1 - s)) = 2 log2(e) atanh(s) in powers s^(2k+1).
constexpr double log2_atanh(int k) { return 2.0 / kLn2 / (2 * k + 1); }

template <typename T, int K, int Terms>
[[gnu::always_inline]] inline T log2_polynomial(T s2) {
  if constexpr (K == Terms - 1) {
    return T(log2_atanh(K));
  } else {
    return T(log2_atanh(K)) + s2 * log2_polynomial<T, K + 1, Terms>(s2);
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

// log2 x = e + log2 m with x = 2^e m, m in [sqrt(1/2), sqrt(2)) (e from the bits of x / sqrt(1/2)), and
// log2 m = 2 log2(e) atanh(s), s = (m - 1) / (m + 1), |s| <= 0.172, from its odd series. About 1 ulp; subnormal x
// are scaled by 2^mantissa_bits first. log2(0) = -inf, log2(inf) = inf, NaN for negative x and NaN. Branch-free.
template <typename T>
[[gnu::always_inline]] inline T fast_log2(T x) {
  using E = Exp2Traits<T>;
  using Bits = typename E::Bits;
  constexpr T kSqrtHalf = T(0.707106781186547524400844362104849039);
  constexpr T kSubnormalScale = T(Bits{1} << E::kMantissaBits);
  constexpr T kRound = T(Bits{3} << (E::kMantissaBits - 1));  // T(e) = bits(kRound) + e read as T, minus kRound
  const bool subnormal = x < std::numeric_limits<T>::min();
  const T normal = subnormal ? x * kSubnormalScale : x;
  const Bits bits = std::bit_cast<Bits>(normal);
  // The exponent of normal / sqrt(1/2), arithmetic shift of the difference of the bit patterns (two's complement).
  const Bits exponent = static_cast<Bits>(static_cast<std::make_signed_t<Bits>>(bits - std::bit_cast<Bits>(kSqrtHalf)) >>
                                          E::kMantissaBits);
  const T m = std::bit_cast<T>(bits - (exponent << E::kMantissaBits));
  const T s = (m - T(1)) / (m + T(1));
  const T e = std::bit_cast<T>(std::bit_cast<Bits>(kRound) + exponent) - kRound - (subnormal ? T(E::kMantissaBits) : T(0));
  const T y = e + s * detail::log2_polynomial<T, 0, E::kLogTerms>(s * s);
  constexpr T kInf = std::numeric_limits<T>::infinity();
  return x > T(0) && x < kInf ? y : x == T(0) ? -kInf : x == kInf ? kInf : std::numeric_limits<T>::quiet_NaN();
}

}  // namespace s2dc::cpu

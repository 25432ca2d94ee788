// The host reference of quantization.h's maps and encoder, element by element: what the
// checkpoint conversions (python_quantization.h) use, and what the CPU loop's vector form
// (csrc/cpu/segment_kernel_impl.h) computes lane by lane. Out of line: one copy in the
// library, compiled with the baseline flags.
#include "quantization.h"

#include <cmath>

namespace noam_ext {
namespace {

// Value j of decade d at level L (2^L values in the decade), per unit of scale.
float decade_value(int32_t d, int32_t L, int32_t j) {
  return std::fma(static_cast<float>(2 * j + 1), std::ldexp(kMeanHalfStep, -L), kMeanOffset) * kDecadeScales[d];
}

int32_t level_shift(bool is_signed) { return is_signed ? 0 : 1; }   // L = d + shift

// The value of a rank among the map's positive values (1.0 at the top rank).
float rank_value(bool is_signed, int32_t rank) {
  if (rank == (is_signed ? kSignedTopRank : kUnsignedTopRank)) {
    return 1.0f;
  }
  const int32_t shift = level_shift(is_signed);
  const int32_t m = rank + 1 + shift;      // 2^L + j
  int32_t L = 0;
  while ((m >> (L + 1)) != 0) {
    ++L;
  }
  return decade_value(L - shift, L, m - (1 << L));
}

}  // namespace

float decade_first_value(bool is_signed, int32_t d) {
  return d == 7 ? 1.0f : decade_value(d, d + level_shift(is_signed), 0);
}

BlockScale block_scale(float absmax) {
  constexpr float kSubnormalPrescale = 18446744073709551616.0f;   // 2^64
  constexpr float kSmallestNormal = 1.17549435e-38f;
  if (absmax == 0.0f) {
    return {1.0f, 0.0f};
  }
  const float prescale = absmax < kSmallestNormal ? kSubnormalPrescale : 1.0f;
  return {prescale, 1.0f / (absmax * prescale)};
}

float map_value(bool is_signed, int32_t code) {
  if (is_signed) {
    if (code == kSignedZeroCode) {
      return 0.0f;
    }
    return code > kSignedZeroCode ? rank_value(true, code - 128) : -rank_value(true, 126 - code);
  }
  return code == kUnsignedZeroCode ? 0.0f : rank_value(false, code - 1);
}

int32_t encode_moment(bool is_signed, float x, float r) {
  const float y = x * r;
  const float a = std::fabs(y);
  const bool negative = y < 0.0f;
  const int32_t shift = level_shift(is_signed);
  int32_t d = 0;
  for (int32_t e = 1; e < 7; ++e) {
    d += a >= decade_first_value(is_signed, e) ? 1 : 0;
  }
  const int32_t L = d + shift;
  const float n = std::ldexp(1.0f, L);
  float u = (a * kDecadeInverses[d] - kMeanOffset) * (kStepsPerUnit * n) - 0.5f;
  u = u > 0.0f ? u : 0.0f;   // (NaN too)
  u = u < n - 1.0f ? u : n - 1.0f;
  const auto j0 = static_cast<int32_t>(u);
  float lo, hi;
  int32_t rank_lo;
  if (a < decade_first_value(is_signed, 0)) {   // below the smallest value: between 0 and it
    lo = 0.0f;
    hi = decade_first_value(is_signed, 0);
    rank_lo = -1;
  } else {
    lo = decade_value(d, L, j0);
    rank_lo = (1 << L) - 1 - shift + j0;
    hi = j0 + 1 < (1 << L) ? decade_value(d, L, j0 + 1) : decade_first_value(is_signed, d + 1);
  }
  // y above the exact midpoint of lo and hi (negative y: at or above, so that a tie goes
  // to the larger magnitude, the lower code).
  const float s = lo + hi;
  const float e = lo - (s - hi);
  const float w = 2.0f * a - s;
  const int32_t rank = rank_lo + ((negative ? w >= e : w > e) ? 1 : 0);
  if (is_signed) {
    if (negative) {
      return 126 - (rank == kSignedTopRank ? kSignedTopRank - 1 : rank);   // there is no -1.0
    }
    return 128 + rank;
  }
  const int32_t code = rank + 1;
  return code == kUnsignedZeroCode && x > 0.0f ? kUnsignedZeroCode + 1 : code;
}

}  // namespace noam_ext

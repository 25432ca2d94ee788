// quantization.h's maps, encoder and block scale, element by element, written once as
// C10_HOST_DEVICE inline functions: the host reference (quantization.cpp) and the CUDA kernels
// (csrc/cuda/quantized_walk.cuh, which the host run of the kernels also compiles) call these.
// The CPU loop's vector form (csrc/cpu/segment_kernel_impl.h) computes the same operations
// lane by lane; tests hold it to quantization.cpp for every instruction set.
//
// Every compilation that includes this header gets the functions in an inline namespace of its
// own (nvcc's, the host run's, each CPU instruction set's, the baseline's): inline functions
// are weak symbols, and without distinct names the linker would keep one compilation's copy
// for all of them (scripts/audit_symbols.py checks the built .so).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "quantization.h"

#if defined(__CUDACC__)
#define NOAM_EXT_QUANTIZATION_COPY nvcc_compiled
#elif defined(NOAM_EXT_KERNELS_ON_HOST)
#define NOAM_EXT_QUANTIZATION_COPY host_run
#elif defined(CPU_CAPABILITY)
#define NOAM_EXT_QUANTIZATION_COPY CPU_CAPABILITY
#else
#define NOAM_EXT_QUANTIZATION_COPY host_reference
#endif

namespace noam_ext::quantization_math {
inline namespace NOAM_EXT_QUANTIZATION_COPY {

// kDecadeScales[d] and kDecadeInverses[d] (quantization.h) as literals: device code cannot
// read a host array. The static_asserts below hold them to the arrays.
C10_HOST_DEVICE constexpr float decade_scale(int32_t d) {
  return d == 0 ? 1e-6f : d == 1 ? 1e-5f : d == 2 ? 1e-4f : d == 3 ? 1e-3f : d == 4 ? 1e-2f : d == 5 ? 1e-1f
       : d == 6 ? 1.0f : 10.0f;
}

C10_HOST_DEVICE constexpr float decade_inverse(int32_t d) {
  return d == 0 ? 1e6f : d == 1 ? 1e5f : d == 2 ? 1e4f : d == 3 ? 1e3f : d == 4 ? 1e2f : d == 5 ? 1e1f
       : d == 6 ? 1.0f : 0.1f;
}

static_assert(decade_scale(0) == kDecadeScales[0] && decade_scale(1) == kDecadeScales[1] &&
              decade_scale(2) == kDecadeScales[2] && decade_scale(3) == kDecadeScales[3] &&
              decade_scale(4) == kDecadeScales[4] && decade_scale(5) == kDecadeScales[5] &&
              decade_scale(6) == kDecadeScales[6] && decade_scale(7) == kDecadeScales[7],
              "decade_scale is kDecadeScales");
static_assert(decade_inverse(0) == kDecadeInverses[0] && decade_inverse(1) == kDecadeInverses[1] &&
              decade_inverse(2) == kDecadeInverses[2] && decade_inverse(3) == kDecadeInverses[3] &&
              decade_inverse(4) == kDecadeInverses[4] && decade_inverse(5) == kDecadeInverses[5] &&
              decade_inverse(6) == kDecadeInverses[6] && decade_inverse(7) == kDecadeInverses[7],
              "decade_inverse is kDecadeInverses");

// 2^e for -126 <= e <= 127, exactly, from its exponent bits.
C10_HOST_DEVICE inline float power_of_two(int32_t e) {
  const uint32_t bits = static_cast<uint32_t>(e + 127) << 23;
  float out;
  memcpy(&out, &bits, sizeof(out));
  return out;
}

C10_HOST_DEVICE inline int32_t level_shift(bool is_signed) { return is_signed ? 0 : 1; }   // L = d + shift

// floor(log2(m)) of 1 <= m < 2^24, from the exponent of m as a float (exact there), as the
// CPU's vector decode takes it (segment_kernel_impl.h, log2_floor): no data-dependent loop,
// which the GPU's lanes would each run for a different count.
C10_HOST_DEVICE inline int32_t log2_floor(int32_t m) {
  const float f = static_cast<float>(m);
  uint32_t bits;
  memcpy(&bits, &f, sizeof(bits));
  return static_cast<int32_t>(bits >> 23) - 127;
}

// Value j of decade d at level L (2^L values in the decade), per unit of scale.
C10_HOST_DEVICE inline float decade_value(int32_t d, int32_t L, int32_t j) {
  return fmaf(static_cast<float>(2 * j + 1), kMeanHalfStep * power_of_two(-L), kMeanOffset) * decade_scale(d);
}

// The first value of decade d (0..6), and for d = 7 the value after decade 6's last: 1.0.
C10_HOST_DEVICE inline float decade_first_value(bool is_signed, int32_t d) {
  return d == 7 ? 1.0f : decade_value(d, d + level_shift(is_signed), 0);
}

// The value of a rank among the map's positive values (1.0 at the top rank).
C10_HOST_DEVICE inline float rank_value(bool is_signed, int32_t rank) {
  if (rank == (is_signed ? kSignedTopRank : kUnsignedTopRank)) {
    return 1.0f;
  }
  const int32_t shift = level_shift(is_signed);
  const int32_t m = rank + 1 + shift;      // 2^L + j
  const int32_t L = log2_floor(m);
  return decade_value(L - shift, L, m - (1 << L));
}

C10_HOST_DEVICE inline float map_value(bool is_signed, int32_t code) {
  if (is_signed) {
    if (code == kSignedZeroCode) {
      return 0.0f;
    }
    return code > kSignedZeroCode ? rank_value(true, code - 128) : -rank_value(true, 126 - code);
  }
  return code == kUnsignedZeroCode ? 0.0f : rank_value(false, code - 1);
}

C10_HOST_DEVICE inline BlockScale block_scale(float absmax) {
  constexpr float kSubnormalPrescale = 18446744073709551616.0f;   // 2^64
  constexpr float kSmallestNormal = 1.17549435e-38f;
  if (absmax == 0.0f) {
    return {1.0f, 0.0f};
  }
  const float prescale = absmax < kSmallestNormal ? kSubnormalPrescale : 1.0f;
  return {prescale, 1.0f / (absmax * prescale)};
}

// The code of moment x (already multiplied by its block's prescale) with reciprocal r.
C10_HOST_DEVICE inline int32_t encode_moment(bool is_signed, float x, float r) {
  const float y = x * r;
  const float a = fabsf(y);
  const bool negative = y < 0.0f;
  const int32_t shift = level_shift(is_signed);
  int32_t d = 0;
  for (int32_t e = 1; e < 7; ++e) {
    d += a >= decade_first_value(is_signed, e) ? 1 : 0;
  }
  const int32_t L = d + shift;
  const float n = power_of_two(L);
  float u = (a * decade_inverse(d) - kMeanOffset) * (kStepsPerUnit * n) - 0.5f;
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

}  // inline namespace NOAM_EXT_QUANTIZATION_COPY
}  // namespace noam_ext::quantization_math

// The interface between the CPU op (adamw_cpu.cpp) and the vectorised element
// loops, which are compiled once per instruction set (segment_kernel_*.cpp)
// and chosen at run time (cpu_capability.cpp). Nothing here depends on the
// instruction set, so the op's translation unit stays portable.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "../noam_ext/adamw_math.h"
#include "../noam_ext/quantization.h"
#include "../noam_ext/storage.h"

namespace noam_ext::cpu {

// Where one tensor's parameter, gradient, moments and master start (a TensorRow's
// pointers); a segment kernel updates elements [begin, end) of them, counted from
// those starts. max_exp_avg_sq is null without amsgrad, master without a master.
struct FlatPointers {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  void* master;
  // 8-bit moments: the scales of exp_avg, exp_avg_sq and max_exp_avg_sq, [k] for the block
  // of elements [k * kQuantBlock, (k + 1) * kQuantBlock) from the starts above (null otherwise).
  // A kernel's `begin` is then a multiple of kQuantBlock, and its `end` one too or the row's end.
  float* absmax[3];
};

// Both precisions of one parameter's coefficients: float is used for
// float/bfloat16/half storage, double for double storage.
struct SegmentCoefficients {
  AdamWCoefficients<float> f32;
  AdamWCoefficients<double> f64;
};

// Stochastic rounding of a range whose elements' indices within the whole parameter
// share their high 32 bits (the caller splits ranges there): the keys of its two draws
// (adamw_math.h, rounding_key) and the low 32 bits of the index of the tensor's element 0
// (element i has index_low_base + i, modulo 2**32).
struct RoundingKeys {
  bool enabled = false;
  uint32_t param_and_exp_avg = 0;
  uint32_t exp_avg_sq_and_max = 0;
  uint32_t index_low_base = 0;
};

// grad_divisor is the AMP grad scale (1 when there is none) and grad_multiplier
// the gradient-clipping factor (1 when not clipping); the kernel divides every
// gradient by the first, then multiplies it by the second, in the math type,
// before the update (torch unscales, then clips, in that order).
using SegmentKernel = void (*)(
    const FlatPointers& buffers, int64_t begin, int64_t end,
    const SegmentCoefficients& coefficients, bool maximize, double grad_divisor, double grad_multiplier,
    const RoundingKeys& rounding);

// One selector per instruction set this build compiled; each returns the kernel
// for a call's storage (storage.h; null when unsupported) and amsgrad flag.
SegmentKernel select_segment_kernel_DEFAULT(const StorageTypes& storage, bool amsgrad);
#if defined(NOAM_EXT_HAVE_AVX2)
SegmentKernel select_segment_kernel_AVX2(const StorageTypes& storage, bool amsgrad);
#endif
#if defined(NOAM_EXT_HAVE_AVX512)
SegmentKernel select_segment_kernel_AVX512(const StorageTypes& storage, bool amsgrad);
#endif

}  // namespace noam_ext::cpu

// The interface between the CPU op (adamw_cpu.cpp) and the vectorised element
// loops, which are compiled once per instruction set (segment_kernel_*.cpp)
// and chosen at run time (cpu_capability.cpp). Nothing here depends on the
// instruction set, so the op's translation unit stays portable.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "../noam_ext/adamw_math.h"

namespace noam_ext::cpu {

// Where one tensor's parameter, gradient and moments start (a TensorRow's
// pointers); a segment kernel updates elements [begin, end) of them, counted
// from those starts. max_exp_avg_sq is null without amsgrad.
struct FlatPointers {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
};

// Both precisions of one parameter's coefficients: float is used for
// float/bfloat16/half storage, double for double storage.
struct SegmentCoefficients {
  AdamWCoefficients<float> f32;
  AdamWCoefficients<double> f64;
};

// grad_divisor is the AMP grad scale (1 when there is none) and grad_multiplier
// the gradient-clipping factor (1 when not clipping); the kernel divides every
// gradient by the first, then multiplies it by the second, in the math type,
// before the update (torch unscales, then clips, in that order).
using SegmentKernel = void (*)(
    const FlatPointers& buffers, int64_t begin, int64_t end,
    const SegmentCoefficients& coefficients, bool maximize, double grad_divisor, double grad_multiplier);

// One selector per instruction set this build compiled; each returns the
// kernel for a storage dtype and amsgrad flag.
SegmentKernel select_segment_kernel_DEFAULT(c10::ScalarType dtype, bool amsgrad);
#if defined(NOAM_EXT_HAVE_AVX2)
SegmentKernel select_segment_kernel_AVX2(c10::ScalarType dtype, bool amsgrad);
#endif
#if defined(NOAM_EXT_HAVE_AVX512)
SegmentKernel select_segment_kernel_AVX512(c10::ScalarType dtype, bool amsgrad);
#endif

}  // namespace noam_ext::cpu

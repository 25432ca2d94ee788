// The vectorised AdamW loop over one contiguous range of one tensor.
// Included by segment_kernel_{default,avx2,avx512}.cpp, each compiled with its
// own instruction-set flags and CPU_CAPABILITY, so that at::vec::Vectorized
// has that instruction set's width (8 floats for DEFAULT and AVX2, 16 for
// AVX-512) and every symbol lands in a namespace of its own.
//
// Only vector code runs here: the tail is a partial vector load/store, so the
// same instructions (and roundings) handle every element of a range, and no
// scalar inline function from a shared header is instantiated with wider
// instructions than the baseline.
#pragma once

#ifndef CPU_CAPABILITY
#error "compile this file with -DCPU_CAPABILITY=<DEFAULT|AVX2|AVX512>"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "segment_kernel.h"

namespace noam_ext {

// Vectorized<T> support for the shared update in adamw_math.h.
template <typename T>
struct MathOps<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static V sqrt(const V& x) { return x.sqrt(); }
  // One rounding on every instruction set: at::vec::fmadd is a true FMA with
  // AVX2/AVX-512, but a*b+c (two roundings) in the portable DEFAULT build.
  static V fmadd(const V& a, const V& b, const V& c) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    return at::vec::fmadd(a, b, c);
#else
    __at_align__ T av[V::size()], bv[V::size()], cv[V::size()];
    a.store(av);
    b.store(bv);
    c.store(cv);
    for (int k = 0; k < V::size(); ++k) {
      av[k] = std::fma(av[k], bv[k], cv[k]);
    }
    return V::loadu(av);
#endif
  }
  static V maximum(const V& a, const V& b) { return at::vec::maximum(a, b); }  // NaN-propagating
};

namespace cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// float and double storage: the math runs in the storage type.
template <typename scalar_t, bool amsgrad>
void update_full_precision(
    const FlatPointers& b, int64_t begin, int64_t end,
    const AdamWCoefficients<scalar_t>& c, bool maximize, double grad_divisor, double grad_multiplier) {
  using V = Vectorized<scalar_t>;
  auto* param = static_cast<scalar_t*>(b.param);
  const auto* grad = static_cast<const scalar_t*>(b.grad);
  auto* exp_avg = static_cast<scalar_t*>(b.exp_avg);
  auto* exp_avg_sq = static_cast<scalar_t*>(b.exp_avg_sq);
  auto* max_exp_avg_sq = static_cast<scalar_t*>(b.max_exp_avg_sq);
  const bool unscale = grad_divisor != 1.0;
  const V divisor(static_cast<scalar_t>(grad_divisor));
  const bool clip = grad_multiplier != 1.0;
  const V multiplier(static_cast<scalar_t>(grad_multiplier));
  for (int64_t i = begin; i < end; i += V::size()) {
    const int64_t count = std::min<int64_t>(V::size(), end - i);
    V p = V::loadu(param + i, count);
    V g = V::loadu(grad + i, count);
    V m = V::loadu(exp_avg + i, count);
    V v = V::loadu(exp_avg_sq + i, count);
    V vmax;
    if constexpr (amsgrad) {
      vmax = V::loadu(max_exp_avg_sq + i, count);
    }
    g = unscaled_clipped_grad(g, unscale, divisor, clip, multiplier);
    adamw_update<amsgrad>(p, g, m, v, &vmax, c, maximize);
    p.store(param + i, count);
    m.store(exp_avg + i, count);
    v.store(exp_avg_sq + i, count);
    if constexpr (amsgrad) {
      vmax.store(max_exp_avg_sq + i, count);
    }
  }
}

// bfloat16 and half storage: widen to float, update, round once on store.
template <typename scalar_t, bool amsgrad>
void update_reduced_precision(
    const FlatPointers& b, int64_t begin, int64_t end,
    const AdamWCoefficients<float>& c, bool maximize, double grad_divisor, double grad_multiplier) {
  using V = Vectorized<scalar_t>;
  using F = Vectorized<float>;
  auto* param = static_cast<scalar_t*>(b.param);
  const auto* grad = static_cast<const scalar_t*>(b.grad);
  auto* exp_avg = static_cast<scalar_t*>(b.exp_avg);
  auto* exp_avg_sq = static_cast<scalar_t*>(b.exp_avg_sq);
  auto* max_exp_avg_sq = static_cast<scalar_t*>(b.max_exp_avg_sq);
  const bool unscale = grad_divisor != 1.0;
  const F divisor(static_cast<float>(grad_divisor));
  const bool clip = grad_multiplier != 1.0;
  const F multiplier(static_cast<float>(grad_multiplier));
  for (int64_t i = begin; i < end; i += V::size()) {
    const int count = static_cast<int>(std::min<int64_t>(V::size(), end - i));
    auto [p0, p1] = at::vec::convert_to_float<scalar_t>(V::loadu(param + i, count));
    auto [g0, g1] = at::vec::convert_to_float<scalar_t>(V::loadu(grad + i, count));
    auto [m0, m1] = at::vec::convert_to_float<scalar_t>(V::loadu(exp_avg + i, count));
    auto [v0, v1] = at::vec::convert_to_float<scalar_t>(V::loadu(exp_avg_sq + i, count));
    F x0, x1;
    if constexpr (amsgrad) {
      std::tie(x0, x1) = at::vec::convert_to_float<scalar_t>(V::loadu(max_exp_avg_sq + i, count));
    }
    g0 = unscaled_clipped_grad(g0, unscale, divisor, clip, multiplier);
    g1 = unscaled_clipped_grad(g1, unscale, divisor, clip, multiplier);
    adamw_update<amsgrad>(p0, g0, m0, v0, &x0, c, maximize);
    adamw_update<amsgrad>(p1, g1, m1, v1, &x1, c, maximize);
    at::vec::convert_from_float<scalar_t>(p0, p1).store(param + i, count);
    at::vec::convert_from_float<scalar_t>(m0, m1).store(exp_avg + i, count);
    at::vec::convert_from_float<scalar_t>(v0, v1).store(exp_avg_sq + i, count);
    if constexpr (amsgrad) {
      at::vec::convert_from_float<scalar_t>(x0, x1).store(max_exp_avg_sq + i, count);
    }
  }
}

template <typename scalar_t, bool amsgrad>
void segment_kernel(
    const FlatPointers& buffers, int64_t begin, int64_t end,
    const SegmentCoefficients& coefficients, bool maximize, double grad_divisor, double grad_multiplier) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    update_full_precision<double, amsgrad>(buffers, begin, end, coefficients.f64, maximize, grad_divisor,
                                           grad_multiplier);
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    update_full_precision<float, amsgrad>(buffers, begin, end, coefficients.f32, maximize, grad_divisor,
                                          grad_multiplier);
  } else {
    update_reduced_precision<scalar_t, amsgrad>(buffers, begin, end, coefficients.f32, maximize, grad_divisor,
                                                grad_multiplier);
  }
}

template <bool amsgrad>
SegmentKernel select_for_dtype(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::ScalarType::Float: return &segment_kernel<float, amsgrad>;
    case c10::ScalarType::Double: return &segment_kernel<double, amsgrad>;
    case c10::ScalarType::BFloat16: return &segment_kernel<c10::BFloat16, amsgrad>;
    case c10::ScalarType::Half: return &segment_kernel<c10::Half, amsgrad>;
    default: return nullptr;
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace noam_ext

#define NOAM_EXT_CONCAT_(a, b) a##_##b
#define NOAM_EXT_CONCAT(a, b) NOAM_EXT_CONCAT_(a, b)

noam_ext::cpu::SegmentKernel noam_ext::cpu::NOAM_EXT_CONCAT(select_segment_kernel, CPU_CAPABILITY)(
    c10::ScalarType dtype, bool amsgrad) {
  return amsgrad ? select_for_dtype<true>(dtype) : select_for_dtype<false>(dtype);
}

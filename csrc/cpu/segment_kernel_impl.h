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

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

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

// ---- every other storage (storage.h): 16-bit values, masters, mixed dtypes -------------------
// Blocks of two float vectors (kBlock elements): a 16-bit vector holds that many, so every
// tensor of a block is one load or store whatever it is stored in.

using F = Vectorized<float>;
using I = Vectorized<int32_t>;
constexpr int64_t kBlock = 2 * F::size();
static_assert(I::size() == F::size(), "int32 and float vectors have the same width");

template <typename T>
inline std::pair<F, F> load_block(const T* p, int64_t count) {
  if constexpr (std::is_same_v<T, float>) {
    if (count == kBlock) {
      return {F::loadu(p), F::loadu(p + F::size())};
    }
    const int64_t first = std::min<int64_t>(count, F::size());
    return {F::loadu(p, first), count > F::size() ? F::loadu(p + F::size(), count - F::size()) : F(0.0f)};
  } else {
    const auto [a, b] = at::vec::convert_to_float<T>(count == kBlock ? Vectorized<T>::loadu(p)
                                                                     : Vectorized<T>::loadu(p, static_cast<int>(count)));
    return {a, b};
  }
}

template <typename T>
inline void store_block(T* p, const F& a, const F& b, int64_t count) {
  if constexpr (std::is_same_v<T, float>) {
    if (count == kBlock) {
      a.store(p);
      b.store(p + F::size());
      return;
    }
    a.store(p, static_cast<int>(std::min<int64_t>(count, F::size())));
    if (count > F::size()) {
      b.store(p + F::size(), static_cast<int>(count - F::size()));
    }
  } else {
    const Vectorized<T> v = at::vec::convert_from_float<T>(a, b);   // round to nearest even
    if (count == kBlock) {
      v.store(p);
    } else {
      v.store(p, static_cast<int>(count));
    }
  }
}

// int16 remainders as sign-extended int32 lanes, and back: one widening load and one
// narrowing store per vector on AVX2/AVX-512 (the remainder variants ran a third slower
// with the plain loops below, which remain for partial blocks and the DEFAULT build).
inline std::pair<I, I> load_remainders(const int16_t* p, int64_t count) {
#if defined(CPU_CAPABILITY_AVX512)
  if (count == kBlock) {
    return {I(_mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))),
            I(_mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + F::size()))))};
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if (count == kBlock) {
    return {I(_mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))),
            I(_mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + F::size()))))};
  }
#endif
  __at_align__ int32_t wide[kBlock];
  for (int64_t k = 0; k < kBlock; ++k) {
    wide[k] = k < count ? p[k] : 0;
  }
  return {I::loadu(wide), I::loadu(wide + F::size())};
}

// (Every lane holds a value of int16's range: a remainder, or 0.)
inline void store_remainders(int16_t* p, const I& a, const I& b, int64_t count) {
#if defined(CPU_CAPABILITY_AVX512)
  if (count == kBlock) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(a));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + F::size()), _mm512_cvtepi32_epi16(b));
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if (count == kBlock) {   // packs saturates, which changes nothing in int16's range
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xd8));
    return;
  }
#endif
  __at_align__ int32_t wide[kBlock];
  a.store(wide);
  b.store(wide + F::size());
  for (int64_t k = 0; k < count; ++k) {
    p[k] = static_cast<int16_t>(wide[k]);
  }
}

// A block of floats that are bfloat16 values already (low 16 bits zero: what stochastic
// rounding and the master's rounding make), stored as their high halves: the bits the
// round-to-nearest conversion of store_block gives them, NaN lanes 0xFFFF as there, in a
// third of its instructions.
inline void store_exact_bfloat16(c10::BFloat16* p, const F& a, const F& b, int64_t count) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i nan = _mm512_set1_epi32(0xffff);
  const __m512i lo = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(a, a, _CMP_ORD_Q), nan,
                                             _mm512_srli_epi32(_mm512_castps_si512(a), 16));
  const __m512i hi = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(b, b, _CMP_ORD_Q), nan,
                                             _mm512_srli_epi32(_mm512_castps_si512(b), 16));
  const Vectorized<c10::BFloat16> v(
      _mm512_permutexvar_epi64(_mm512_set_epi64(7, 5, 3, 1, 6, 4, 2, 0), _mm512_packus_epi32(lo, hi)));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i nan = _mm256_set1_epi32(0xffff);
  const __m256i lo = _mm256_blendv_epi8(nan, _mm256_srli_epi32(_mm256_castps_si256(a), 16),
                                        _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_ORD_Q)));
  const __m256i hi = _mm256_blendv_epi8(nan, _mm256_srli_epi32(_mm256_castps_si256(b), 16),
                                        _mm256_castps_si256(_mm256_cmp_ps(b, b, _CMP_ORD_Q)));
  const Vectorized<c10::BFloat16> v(_mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xd8));
#endif
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if (count == kBlock) {
    v.store(p);
  } else {
    v.store(p, static_cast<int>(count));
  }
#else
  store_block(p, a, b, count);   // the portable build's conversion (exact on these values)
#endif
}

// store_block, or store_exact_bfloat16 where the values are known to be bfloat16 already.
template <typename T>
inline void store_values(T* p, const F& a, const F& b, int64_t count, bool bfloat16_already) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (bfloat16_already) {
      store_exact_bfloat16(p, a, b, count);
      return;
    }
  }
  store_block(p, a, b, count);
}

// Bit-level helpers, lane by lane what adamw_math.h does per element.
inline I as_bits(const F& x) { return at::vec::cast<int32_t>(x); }
inline F from_bits(const I& x) { return at::vec::cast<float>(x); }
inline I shift_right_logical(const I& x, int n) {   // operator>> is arithmetic on int32
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_srli_epi32(x, n);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_srli_epi32(x, n);
#else
  return (x >> I(n)) & I(static_cast<int32_t>(0xFFFFFFFFu >> n));
#endif
}
inline I mix32(I x) {
  x = x ^ shift_right_logical(x, 16);
  x = x * I(static_cast<int32_t>(0x7FEB352Du));
  x = x ^ shift_right_logical(x, 15);
  x = x * I(static_cast<int32_t>(0x846CA68Bu));
  return x ^ shift_right_logical(x, 16);
}
// rounding_bits(key, index_low) for the F::size() elements from `first`.
inline I rounding_bits(uint32_t key, uint32_t index_low_base, int64_t first) {
  const I index = I(static_cast<int32_t>(index_low_base + static_cast<uint32_t>(first))) + I::arange(0, 1);
  return mix32(index * I(static_cast<int32_t>(0x9E3779B9u)) + I(static_cast<int32_t>(key)));
}
// (Functions, not constants: a vector constant would run this file's instructions when the
// library loads, on any CPU.)
inline I low16() { return I(0xFFFF); }
inline I high16() { return I(static_cast<int32_t>(0xFFFF0000u)); }
// stochastic_bfloat16_value, lane by lane (a NaN lane is kept for the conversion).
inline F stochastic_bfloat16(const F& x, const I& random16) {
  return F::blendv(from_bits((as_bits(x) + (random16 & low16())) & high16()), x, x.isnan());
}
// master_to_bfloat16_value: to nearest, ties away from zero (what a remainder undoes).
inline F master_to_bfloat16(const F& x) {
  return F::blendv(from_bits((as_bits(x) + I(0x8000)) & high16()), x, x.isnan());
}
// split_master's remainder (0 in a NaN lane), given the rounded value of the lane.
inline I master_remainder(const F& master, const F& rounded) {
  const I r = as_bits(master) - as_bits(rounded);
  return r ^ (r & as_bits(master.isnan()));
}

template <typename P, typename G, typename M, MasterKind kMaster, bool amsgrad>
void update_mixed(const FlatPointers& b, int64_t begin, int64_t end, const AdamWCoefficients<float>& c,
                  bool maximize, double grad_divisor, double grad_multiplier, const RoundingKeys& rounding) {
  // What stochastic rounding can round here: a bfloat16 parameter that is its own
  // master, and bfloat16 moments.
  constexpr bool kRoundParam = std::is_same_v<P, c10::BFloat16> && kMaster == MasterKind::kNone;
  constexpr bool kRoundMoments = std::is_same_v<M, c10::BFloat16>;
  auto* param = static_cast<P*>(b.param);
  const auto* grad = static_cast<const G*>(b.grad);
  auto* exp_avg = static_cast<M*>(b.exp_avg);
  auto* exp_avg_sq = static_cast<M*>(b.exp_avg_sq);
  auto* max_exp_avg_sq = static_cast<M*>(b.max_exp_avg_sq);
  auto* master = static_cast<float*>(b.master);
  auto* remainder = static_cast<int16_t*>(b.master);
  const bool unscale = grad_divisor != 1.0;
  const F divisor(static_cast<float>(grad_divisor));
  const bool clip = grad_multiplier != 1.0;
  const F multiplier(static_cast<float>(grad_multiplier));
  const bool stochastic = rounding.enabled && (kRoundParam || kRoundMoments);
  for (int64_t i = begin; i < end; i += kBlock) {
    const int64_t count = std::min<int64_t>(kBlock, end - i);
    F p0, p1;
    if constexpr (kMaster == MasterKind::kFloat32) {
      std::tie(p0, p1) = load_block(master + i, count);
    } else if constexpr (kMaster == MasterKind::kRemainder) {
      // join_master: the bfloat16's bits in the high half plus the signed remainder.
      const auto [h0, h1] = load_block(param + i, count);
      const auto [r0, r1] = load_remainders(remainder + i, count);
      p0 = from_bits(as_bits(h0) + r0);
      p1 = from_bits(as_bits(h1) + r1);
    } else {
      std::tie(p0, p1) = load_block(param + i, count);
    }
    auto [g0, g1] = load_block(grad + i, count);
    auto [m0, m1] = load_block(exp_avg + i, count);
    auto [v0, v1] = load_block(exp_avg_sq + i, count);
    F x0, x1;
    if constexpr (amsgrad) {
      std::tie(x0, x1) = load_block(max_exp_avg_sq + i, count);
    }
    g0 = unscaled_clipped_grad(g0, unscale, divisor, clip, multiplier);
    g1 = unscaled_clipped_grad(g1, unscale, divisor, clip, multiplier);
    adamw_update<amsgrad>(p0, g0, m0, v0, &x0, c, maximize);
    adamw_update<amsgrad>(p1, g1, m1, v1, &x1, c, maximize);
    if (stochastic) {
      // One draw per element for (parameter, exp_avg), one for (exp_avg_sq, max).
      const I a0 = rounding_bits(rounding.param_and_exp_avg, rounding.index_low_base, i);
      const I a1 = rounding_bits(rounding.param_and_exp_avg, rounding.index_low_base, i + F::size());
      if constexpr (kRoundParam) {
        p0 = stochastic_bfloat16(p0, a0);
        p1 = stochastic_bfloat16(p1, a1);
      }
      if constexpr (kRoundMoments) {
        m0 = stochastic_bfloat16(m0, shift_right_logical(a0, 16));
        m1 = stochastic_bfloat16(m1, shift_right_logical(a1, 16));
        const I s0 = rounding_bits(rounding.exp_avg_sq_and_max, rounding.index_low_base, i);
        const I s1 = rounding_bits(rounding.exp_avg_sq_and_max, rounding.index_low_base, i + F::size());
        v0 = stochastic_bfloat16(v0, s0);
        v1 = stochastic_bfloat16(v1, s1);
        if constexpr (amsgrad) {
          x0 = stochastic_bfloat16(x0, shift_right_logical(s0, 16));
          x1 = stochastic_bfloat16(x1, shift_right_logical(s1, 16));
        }
      }
    }
    if constexpr (kMaster == MasterKind::kNone) {
      store_values(param + i, p0, p1, count, /*bfloat16_already=*/kRoundParam && stochastic);
    } else if constexpr (std::is_same_v<P, c10::Half>) {
      store_block(master + i, p0, p1, count);
      store_block(param + i, p0, p1, count);   // float16: the master rounded to nearest even
    } else {
      const F q0 = master_to_bfloat16(p0), q1 = master_to_bfloat16(p1);
      store_exact_bfloat16(param + i, q0, q1, count);   // q is a bfloat16 value
      if constexpr (kMaster == MasterKind::kFloat32) {
        store_block(master + i, p0, p1, count);
      } else {
        store_remainders(remainder + i, master_remainder(p0, q0), master_remainder(p1, q1), count);
      }
    }
    const bool moments_rounded = kRoundMoments && stochastic;   // bfloat16 values already
    store_values(exp_avg + i, m0, m1, count, moments_rounded);
    store_values(exp_avg_sq + i, v0, v1, count, moments_rounded);
    if constexpr (amsgrad) {
      store_values(max_exp_avg_sq + i, x0, x1, count, moments_rounded);
    }
  }
}

// The loop for kSupportedStorage[index].
template <int index, bool amsgrad>
void segment_kernel(const FlatPointers& buffers, int64_t begin, int64_t end, const SegmentCoefficients& coefficients,
                    bool maximize, double grad_divisor, double grad_multiplier, const RoundingKeys& rounding) {
  constexpr StorageTypes s = kSupportedStorage[index];
  using P = storage_t<s.param>;
  using G = storage_t<s.grad>;
  using M = storage_t<s.moment>;
  constexpr bool plain = s.grad == s.param && s.moment == s.param && s.master == MasterKind::kNone;
  if constexpr (plain && std::is_same_v<P, double>) {
    update_full_precision<double, amsgrad>(buffers, begin, end, coefficients.f64, maximize, grad_divisor,
                                           grad_multiplier);
  } else if constexpr (plain && std::is_same_v<P, float>) {
    update_full_precision<float, amsgrad>(buffers, begin, end, coefficients.f32, maximize, grad_divisor,
                                          grad_multiplier);
  } else {
    update_mixed<P, G, M, s.master, amsgrad>(buffers, begin, end, coefficients.f32, maximize, grad_divisor,
                                             grad_multiplier, rounding);
  }
}

template <bool amsgrad>
SegmentKernel select_for_storage(const StorageTypes& storage) {
  SegmentKernel kernel = nullptr;
  dispatch_storage(storage, [&](auto index) { kernel = &segment_kernel<decltype(index)::value, amsgrad>; });
  return kernel;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace noam_ext

#define NOAM_EXT_CONCAT_(a, b) a##_##b
#define NOAM_EXT_CONCAT(a, b) NOAM_EXT_CONCAT_(a, b)

noam_ext::cpu::SegmentKernel noam_ext::cpu::NOAM_EXT_CONCAT(select_segment_kernel, CPU_CAPABILITY)(
    const StorageTypes& storage, bool amsgrad) {
  return amsgrad ? select_for_storage<true>(storage) : select_for_storage<false>(storage);
}

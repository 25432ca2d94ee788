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

// The float32 value of a block of parameters: the parameter itself, its float32 master, or
// (join_master) the bfloat16's bits in the high half plus the signed remainder.
template <typename P, MasterKind kMaster>
inline std::pair<F, F> load_parameters(const P* param, const void* master, int64_t i, int64_t count) {
  if constexpr (kMaster == MasterKind::kFloat32) {
    return load_block(static_cast<const float*>(master) + i, count);
  } else if constexpr (kMaster == MasterKind::kRemainder) {
    const auto [h0, h1] = load_block(param + i, count);
    const auto [r0, r1] = load_remainders(static_cast<const int16_t*>(master) + i, count);
    return {from_bits(as_bits(h0) + r0), from_bits(as_bits(h1) + r1)};
  } else {
    return load_block(param + i, count);
  }
}

// A block's updated parameters stored: the parameter itself (`bfloat16_already` after
// stochastic rounding), or the master and the parameter it rounds to (float16: to nearest
// even; bfloat16: to nearest, ties away, with the remainder that undoes it).
template <typename P, MasterKind kMaster>
inline void store_parameters(P* param, void* master, int64_t i, const F& p0, const F& p1, int64_t count,
                             bool bfloat16_already) {
  if constexpr (kMaster == MasterKind::kNone) {
    store_values(param + i, p0, p1, count, bfloat16_already);
  } else if constexpr (std::is_same_v<P, c10::Half>) {
    store_block(static_cast<float*>(master) + i, p0, p1, count);
    store_block(param + i, p0, p1, count);   // float16: the master rounded to nearest even
  } else {
    const F q0 = master_to_bfloat16(p0), q1 = master_to_bfloat16(p1);
    store_exact_bfloat16(param + i, q0, q1, count);   // q is a bfloat16 value
    if constexpr (kMaster == MasterKind::kFloat32) {
      store_block(static_cast<float*>(master) + i, p0, p1, count);
    } else {
      store_remainders(static_cast<int16_t*>(master) + i, master_remainder(p0, q0), master_remainder(p1, q1), count);
    }
  }
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
  const bool unscale = grad_divisor != 1.0;
  const F divisor(static_cast<float>(grad_divisor));
  const bool clip = grad_multiplier != 1.0;
  const F multiplier(static_cast<float>(grad_multiplier));
  const bool stochastic = rounding.enabled && (kRoundParam || kRoundMoments);
  for (int64_t i = begin; i < end; i += kBlock) {
    const int64_t count = std::min<int64_t>(kBlock, end - i);
    auto [p0, p1] = load_parameters<P, kMaster>(param, b.master, i, count);
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
    store_parameters<P, kMaster>(param, b.master, i, p0, p1, count, /*bfloat16_already=*/kRoundParam && stochastic);
    const bool moments_rounded = kRoundMoments && stochastic;   // bfloat16 values already
    store_values(exp_avg + i, m0, m1, count, moments_rounded);
    store_values(exp_avg_sq + i, v0, v1, count, moments_rounded);
    if constexpr (amsgrad) {
      store_values(max_exp_avg_sq + i, x0, x1, count, moments_rounded);
    }
  }
}

// ---- 8-bit moments (quantization.h): codes with a float32 scale per block ------------------
// Each block of kQuantBlock elements is decoded, updated in float32 and its parameter written
// vector by vector (the update reads the new moments from registers, never decoded ones), its
// new moments kept in a small buffer; then its new scales (the largest magnitudes) are taken
// and the moments encoded to the nearest codes from the buffer.

// F::size() codes as int32 lanes; lanes past `count` get `fill` (the zero code: they decode
// to 0 and stay 0 through the update).
inline I load_codes(const uint8_t* p, int64_t count, int32_t fill) {
#if defined(CPU_CAPABILITY_AVX512)
  if (count >= F::size()) {
    return I(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if (count >= F::size()) {
    return I(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
#endif
  __at_align__ int32_t wide[F::size()];
  for (int64_t k = 0; k < F::size(); ++k) {
    wide[k] = k < count ? p[k] : fill;
  }
  return I::loadu(wide);
}

// The first `count` (at most F::size()) lanes, each a code in [0, 255], as bytes.
inline void store_codes(uint8_t* p, const I& codes, int64_t count) {
#if defined(CPU_CAPABILITY_AVX512)
  if (count >= F::size()) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(codes));
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if (count >= F::size()) {   // packus saturates, which changes nothing in [0, 255]
    const __m256i c = codes;
    const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(words, words));
    return;
  }
#endif
  __at_align__ int32_t wide[F::size()];
  codes.store(wide);
  for (int64_t k = 0; k < count && k < F::size(); ++k) {
    p[k] = static_cast<uint8_t>(wide[k]);
  }
}

// table[index] lane by lane, for an 8-entry table (indices 0..7): one permute.
inline F lookup8(const float (&table)[8], const I& index) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_permutexvar_ps(index, _mm512_castps256_ps512(_mm256_loadu_ps(table)));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_permutevar8x32_ps(_mm256_loadu_ps(table), index);
#else
  __at_align__ int32_t lanes[F::size()];
  __at_align__ float out[F::size()];
  index.store(lanes);
  for (int64_t k = 0; k < F::size(); ++k) {
    out[k] = table[lanes[k]];
  }
  return F::loadu(out);
#endif
}

// The same for a table already in a register (its first 8 lanes).
inline F lookup8(const F& table, const I& index) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_permutexvar_ps(index, table);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_permutevar8x32_ps(table, index);
#else
  __at_align__ int32_t lanes[F::size()];
  __at_align__ float values[F::size()];
  __at_align__ float out[F::size()];
  index.store(lanes);
  table.store(values);
  for (int64_t k = 0; k < F::size(); ++k) {
    out[k] = values[lanes[k]];
  }
  return F::loadu(out);
#endif
}

inline F to_float(const I& x) { return at::vec::convert_to_fp_of_same_size<float>(x); }
inline I truncate_to_int(const F& x) { return at::vec::convert_to_int_of_same_size<float>(x); }
// 2^L and 0.45 * 2^-L as floats, from L's lanes (0 <= L <= 8), by their exponent bits.
inline F power_of_two(const I& L) { return from_bits((L + I(127)) * I(1 << 23)); }
inline F half_step(const I& L) {
  return from_bits(as_bits(F(kMeanHalfStep)) - L * I(1 << 23));
}
// quantization.cpp's decade_value, lane by lane (the same float operations, so the same bits).
inline F decade_value(const I& d, const I& L, const F& j) {
  return MathOps<F>::fmadd(j * F(2.0f) + F(1.0f), half_step(L), F(kMeanOffset)) * lookup8(kDecadeScales, d);
}
// floor(log2(m)) of m >= 1, from the float's exponent.
inline I log2_floor(const I& m) { return shift_right_logical(as_bits(to_float(m)), 23) - I(127); }

// F::size() moments of a block decoded: quantization.cpp's map_value times the block's scale.
inline F decode(bool is_signed, const uint8_t* codes, int64_t count, float scale) {
  const I code = load_codes(codes, count, is_signed ? kSignedZeroCode : kUnsignedZeroCode);
  const int32_t shift = is_signed ? 0 : 1;
  // rank among the positive values (negative codes mirror them), then m = 2^L + j
  const I negative = is_signed ? (code < I(kSignedZeroCode)) : I(0);
  const I rank = is_signed ? I::blendv(code - I(128), I(126) - code, negative) : code - I(1);
  const I m = rank + I(1 + shift);
  const I L = log2_floor(at::vec::maximum(m, I(1)));
  const F j = to_float(m) - power_of_two(L);
  // (The zero code's lanes compute a value that is then replaced; their decade is clamped to 0
  // so that the table lookup stays in it.)
  F value = decade_value(at::vec::maximum(L - I(shift), I(0)), L, j);
  const I top = rank == I(is_signed ? kSignedTopRank : kUnsignedTopRank);
  const I zero = code == I(is_signed ? kSignedZeroCode : kUnsignedZeroCode);
  value = F::blendv(value, F(1.0f), from_bits(top));
  value = F::blendv(value, F(0.0f), from_bits(zero));
  if (is_signed) {
    value = F::blendv(value, F(0.0f) - value, from_bits(negative));
  }
  return value * F(scale);
}

// The codes of a block's n moments x (in `values`) with reciprocal r, into `codes`: lane by
// lane quantization.cpp's encode_moment (the exact nearest code, ties to the lower code, no
// -1.0, and the zero rule of the unsigned map).
// `firsts` is quantization.cpp's decade_first_value for d = 0..7, made once (DecadeFirsts).
struct DecadeFirsts {
  float value[8];
  explicit DecadeFirsts(bool is_signed) {
    for (int32_t d = 0; d < 8; ++d) {
      value[d] = decade_first_value(is_signed, d);
    }
  }
};

inline void encode_block(bool is_signed, const DecadeFirsts& firsts, const float* values, int64_t n,
                         float reciprocal, uint8_t* codes) {
  const int32_t shift = is_signed ? 0 : 1;
  const F r(reciprocal);
  // In registers for the whole block: read through `firsts` inside the loop, every value would
  // be loaded again after each store of codes (a uint8_t store may alias any object).
  F first[7];
  for (int32_t e = 0; e < 7; ++e) {
    first[e] = F(firsts.value[e]);
  }
  const F first_table = F::loadu(firsts.value, 8);   // the table of lookup8 below, likewise
  for (int64_t v = 0; v * F::size() < n; ++v) {
    const F x = F::loadu(values + v * F::size());
    const F y = x * r;
    const F a = y.abs();
    I d(0);
    for (int32_t e = 1; e < 7; ++e) {
      d = d - as_bits(a >= first[e]);   // a true compare is -1
    }
    const I L = d + I(shift);
    const F n_values = power_of_two(L);
    F u = (a * lookup8(kDecadeInverses, d) - F(kMeanOffset)) * (F(kStepsPerUnit) * n_values) - F(0.5f);
    u = at::vec::minimum(F::blendv(F(0.0f), u, u > F(0.0f)), n_values - F(1.0f));   // (NaN -> 0)
    const F j0 = to_float(truncate_to_int(u));
    const F below = a < first[0];   // between 0 and the smallest value
    F lo = decade_value(d, L, j0);
    // the upper neighbour: the next value of the decade, or past its last the next decade's first
    const F next_in_decade = j0 + F(1.0f) < n_values;
    F hi = F::blendv(lookup8(first_table, d + I(1)), decade_value(d, L, j0 + F(1.0f)), next_in_decade);
    I rank_lo = truncate_to_int(n_values) - I(1 + shift) + truncate_to_int(j0);
    lo = F::blendv(lo, F(0.0f), below);
    hi = F::blendv(hi, first[0], below);
    rank_lo = I::blendv(rank_lo, I(-1), as_bits(below));
    const F s = lo + hi;
    const F e = lo - (s - hi);
    const F w = a * F(2.0f) - s;
    const F negative = y < F(0.0f);
    const F pick_hi = F::blendv(w > e, w >= e, negative);
    const I rank = rank_lo - as_bits(pick_hi);
    I code;
    if (is_signed) {
      const I capped = at::vec::minimum(rank, I(kSignedTopRank - 1));   // there is no -1.0
      code = I::blendv(rank + I(128), I(126) - capped, as_bits(negative));
    } else {
      code = rank + I(1);
      code = code - (as_bits(x > F(0.0f)) & (code == I(kUnsignedZeroCode)));   // never 0 for a positive moment
    }
    store_codes(codes + v * F::size(), code, n - v * F::size());
  }
}

// The largest of a block's values, NaN if any is NaN (so that its block decodes to NaN).
inline float peak_of(const float* values, int64_t n) {
  F peak(0.0f);
  for (int64_t j = 0; j < n; j += F::size()) {
    peak = at::vec::maximum(peak, F::loadu(values + j, static_cast<int>(std::min<int64_t>(F::size(), n - j))).abs());
  }
  __at_align__ float lanes[F::size()];
  peak.store(lanes);
  float out = 0.0f;
  for (int64_t k = 0; k < F::size(); ++k) {
    out = (lanes[k] != lanes[k] || lanes[k] > out) ? lanes[k] : out;
  }
  return out;
}

template <typename P, typename G, MasterKind kMaster, bool amsgrad>
void update_quantized(const FlatPointers& b, int64_t begin, int64_t end, const AdamWCoefficients<float>& c,
                      bool maximize, double grad_divisor, double grad_multiplier, const RoundingKeys& rounding) {
  constexpr bool kRoundParam = std::is_same_v<P, c10::BFloat16> && kMaster == MasterKind::kNone;
  constexpr int kMoments = amsgrad ? 3 : 2;   // exp_avg, exp_avg_sq, max_exp_avg_sq
  constexpr const bool (&kSigned)[3] = kQuantizedSigned;   // exp_avg's map; exp_avg_sq's and its max's
  static const DecadeFirsts firsts[2] = {DecadeFirsts(false), DecadeFirsts(true)};   // by kSigned
  auto* param = static_cast<P*>(b.param);
  const auto* grad = static_cast<const G*>(b.grad);
  uint8_t* codes[3] = {static_cast<uint8_t*>(b.exp_avg), static_cast<uint8_t*>(b.exp_avg_sq),
                       static_cast<uint8_t*>(b.max_exp_avg_sq)};
  const bool unscale = grad_divisor != 1.0;
  const F divisor(static_cast<float>(grad_divisor));
  const bool clip = grad_multiplier != 1.0;
  const F multiplier(static_cast<float>(grad_multiplier));
  const bool stochastic = rounding.enabled && kRoundParam;
  static_assert(kQuantBlock % kBlock == 0, "a quantization block is whole vector blocks");
  __at_align__ float moments[3][kQuantBlock];   // the block's new moments, for its scales and codes
  for (int64_t start = begin; start < end; start += kQuantBlock) {
    const int64_t n = std::min<int64_t>(kQuantBlock, end - start);
    const int64_t block = start / kQuantBlock;
    float scale[3] = {0.0f, 0.0f, 0.0f};
    for (int k = 0; k < kMoments; ++k) {
      scale[k] = b.absmax[k][block];
    }
    for (int64_t j = 0; j < n; j += kBlock) {
      const int64_t i = start + j;
      const int64_t count = std::min<int64_t>(kBlock, n - j);
      const int64_t count1 = count - F::size();   // lanes of the second vector (may be <= 0)
      auto [p0, p1] = load_parameters<P, kMaster>(param, b.master, i, count);
      auto [g0, g1] = load_block(grad + i, count);
      F m0 = decode(kSigned[0], codes[0] + i, count, scale[0]);
      F m1 = decode(kSigned[0], codes[0] + i + F::size(), count1, scale[0]);
      F v0 = decode(kSigned[1], codes[1] + i, count, scale[1]);
      F v1 = decode(kSigned[1], codes[1] + i + F::size(), count1, scale[1]);
      F x0, x1;
      if constexpr (amsgrad) {
        x0 = decode(kSigned[2], codes[2] + i, count, scale[2]);
        x1 = decode(kSigned[2], codes[2] + i + F::size(), count1, scale[2]);
      }
      g0 = unscaled_clipped_grad(g0, unscale, divisor, clip, multiplier);
      g1 = unscaled_clipped_grad(g1, unscale, divisor, clip, multiplier);
      adamw_update<amsgrad>(p0, g0, m0, v0, &x0, c, maximize);
      adamw_update<amsgrad>(p1, g1, m1, v1, &x1, c, maximize);
      if (stochastic) {
        p0 = stochastic_bfloat16(p0, rounding_bits(rounding.param_and_exp_avg, rounding.index_low_base, i));
        p1 = stochastic_bfloat16(p1, rounding_bits(rounding.param_and_exp_avg, rounding.index_low_base, i + F::size()));
      }
      store_parameters<P, kMaster>(param, b.master, i, p0, p1, count, /*bfloat16_already=*/kRoundParam && stochastic);
      m0.store(moments[0] + j);
      m1.store(moments[0] + j + F::size());
      v0.store(moments[1] + j);
      v1.store(moments[1] + j + F::size());
      if constexpr (amsgrad) {
        x0.store(moments[2] + j);
        x1.store(moments[2] + j + F::size());
      }
    }
    for (int k = 0; k < kMoments; ++k) {
      const float peak = peak_of(moments[k], n);
      const BlockScale scale = block_scale(peak);
      if (scale.prescale != 1.0f) {   // a subnormal absmax (rare): scale the moments first, exactly
        for (int64_t j = 0; j < n; ++j) {
          moments[k][j] *= scale.prescale;
        }
      }
      encode_block(kSigned[k], firsts[kSigned[k] ? 1 : 0], moments[k], n, scale.reciprocal, codes[k] + start);
      b.absmax[k][block] = peak;
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
  if constexpr (s.quantized()) {
    update_quantized<P, G, s.master, amsgrad>(buffers, begin, end, coefficients.f32, maximize, grad_divisor,
                                              grad_multiplier, rounding);
  } else if constexpr (plain && std::is_same_v<P, double>) {
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

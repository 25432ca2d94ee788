// One element's update for a storage of csrc/noam_ext/storage.h: widen every stored value
// to the math type, update with the shared math (csrc/noam_ext/adamw_math.h), round or
// split once to store; and a step of elements, loaded and stored as vectors.
#pragma once

#include "kernels_namespace.h"

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <type_traits>

#include "../noam_ext/adamw_math.h"
#include "../noam_ext/work_split.h"
#include "call_args.cuh"
#include "launch_policy.cuh"
#include "vector_access.cuh"

namespace noam_ext::cuda_plan {
inline namespace NOAM_EXT_KERNELS_COPY {

// A bfloat16 from a float that bfloat16 represents exactly (the rounding is done).
C10_HOST_DEVICE C10_ALWAYS_INLINE c10::BFloat16 exact_bfloat16(float x) {
  return c10::BFloat16(x);   // to nearest even: exact for a bfloat16 value, a NaN stays a NaN
}

// One element: widen, update with the shared math, round or split once. `element` is
// its index within its row (stochastic rounding's index, with the row's offset).
template <int kStorage, bool amsgrad>
C10_HOST_DEVICE C10_ALWAYS_INLINE void update_element(
    typename StorageTraits<kStorage>::param_t& p, typename StorageTraits<kStorage>::grad_t g,
    typename StorageTraits<kStorage>::moment_t& m, typename StorageTraits<kStorage>::moment_t& v,
    typename StorageTraits<kStorage>::moment_t* vmax, typename StorageTraits<kStorage>::master_t* master,
    const RowCoefficients<typename StorageTraits<kStorage>::opmath_t>& c,
    const GradFactors<typename StorageTraits<kStorage>::opmath_t>& f, int64_t element) {
  using S = StorageTraits<kStorage>;
  using opmath_t = typename S::opmath_t;
  using param_t = typename S::param_t;
  using moment_t = typename S::moment_t;
  opmath_t param;
  if constexpr (S::kMaster == MasterKind::kFloat32) {
    param = *master;
  } else if constexpr (S::kMaster == MasterKind::kRemainder) {
    param = join_master(p.x, *master);
  } else {
    param = static_cast<opmath_t>(p);
  }
  opmath_t grad = static_cast<opmath_t>(g);
  opmath_t exp_avg = static_cast<opmath_t>(m);
  opmath_t exp_avg_sq = static_cast<opmath_t>(v);
  opmath_t max_sq = amsgrad ? static_cast<opmath_t>(*vmax) : opmath_t(0);
  grad = unscaled_clipped_grad(grad, f.unscale, f.divisor, f.clip, f.multiplier);
  adamw_update<amsgrad>(param, grad, exp_avg, exp_avg_sq, &max_sq, c.coefficients, c.maximize != 0);
  // Stochastic rounding's two draws for this element (only storages that store bfloat16).
  uint32_t draw_param_and_exp_avg = 0, draw_exp_avg_sq_and_max = 0;
  bool stochastic = false;
  if constexpr (S::kCanRound) {
    stochastic = c.stochastic_rounding != 0;
    if (stochastic) {
      const auto index = static_cast<uint64_t>(c.element_offset + element);
      const auto high = static_cast<uint32_t>(index >> 32);
      uint32_t key_a = c.key_param_and_exp_avg, key_b = c.key_exp_avg_sq_and_max;
      if (high != c.key_index_high) {   // a row past a multiple of 2**32 elements
        key_a = rounding_key(c.rng_stream, c.rounding_step, kParamAndExpAvg, high);
        key_b = rounding_key(c.rng_stream, c.rounding_step, kExpAvgSqAndMax, high);
      }
      draw_param_and_exp_avg = rounding_bits(key_a, static_cast<uint32_t>(index));
      if constexpr (std::is_same_v<moment_t, c10::BFloat16>) {
        draw_exp_avg_sq_and_max = rounding_bits(key_b, static_cast<uint32_t>(index));
      }
    }
  }
  if constexpr (S::kMaster == MasterKind::kFloat32) {
    *master = param;
    if constexpr (std::is_same_v<param_t, c10::BFloat16>) {
      p = exact_bfloat16(master_to_bfloat16_value(param));
    } else {
      p = static_cast<param_t>(param);   // float16: the master rounded to nearest even
    }
  } else if constexpr (S::kMaster == MasterKind::kRemainder) {
    const MasterSplit split = split_master(param);
    p = c10::BFloat16(split.param_bits, c10::BFloat16::from_bits());
    *master = split.remainder;
  } else if constexpr (std::is_same_v<param_t, c10::BFloat16>) {
    p = stochastic ? exact_bfloat16(stochastic_bfloat16_value(param, draw_param_and_exp_avg))
                   : static_cast<param_t>(param);
  } else {
    p = static_cast<param_t>(param);
  }
  if constexpr (std::is_same_v<moment_t, c10::BFloat16> && S::kCanRound) {
    if (stochastic) {
      m = exact_bfloat16(stochastic_bfloat16_value(exp_avg, draw_param_and_exp_avg >> 16));
      v = exact_bfloat16(stochastic_bfloat16_value(exp_avg_sq, draw_exp_avg_sq_and_max));
      if constexpr (amsgrad) {
        *vmax = exact_bfloat16(stochastic_bfloat16_value(max_sq, draw_exp_avg_sq_and_max >> 16));
      }
      return;
    }
  }
  m = static_cast<moment_t>(exp_avg);
  v = static_cast<moment_t>(exp_avg_sq);
  if constexpr (amsgrad) {
    *vmax = static_cast<moment_t>(max_sq);
  }
}

// The typed pointers of one row, from element `lo` on.
template <int kStorage>
struct RowPointers {
  using S = StorageTraits<kStorage>;
  typename S::param_t* param;
  const typename S::grad_t* grad;
  typename S::moment_t* exp_avg;
  typename S::moment_t* exp_avg_sq;
  typename S::moment_t* max_exp_avg_sq;
  typename S::master_t* master;
};

template <int kStorage, bool amsgrad>
C10_HOST_DEVICE C10_ALWAYS_INLINE RowPointers<kStorage> typed_from(const TensorRow& r, int64_t lo) {
  using S = StorageTraits<kStorage>;
  return {static_cast<typename S::param_t*>(r.param) + lo, static_cast<const typename S::grad_t*>(r.grad) + lo,
          static_cast<typename S::moment_t*>(r.exp_avg) + lo, static_cast<typename S::moment_t*>(r.exp_avg_sq) + lo,
          amsgrad ? static_cast<typename S::moment_t*>(r.max_exp_avg_sq) + lo : nullptr,
          S::kMaster != MasterKind::kNone ? static_cast<typename S::master_t*>(r.master) + lo : nullptr};
}

// Element i of a row's part (`first` is the part's first element within the row).
template <int kStorage, bool amsgrad>
C10_HOST_DEVICE C10_ALWAYS_INLINE void update_one(const RowPointers<kStorage>& a,
                                                  const RowCoefficients<typename StorageTraits<kStorage>::opmath_t>& c,
                                                  const GradFactors<typename StorageTraits<kStorage>::opmath_t>& f,
                                                  int64_t i, int64_t first) {
  update_element<kStorage, amsgrad>(a.param[i], a.grad[i], a.exp_avg[i], a.exp_avg_sq[i],
                                    amsgrad ? a.max_exp_avg_sq + i : nullptr,
                                    StorageTraits<kStorage>::kMaster != MasterKind::kNone ? a.master + i : nullptr,
                                    c, f, first + i);
}

// The tensors of one step of a row's part (kWidth elements of each).
template <int kStorage, bool amsgrad>
struct Step {
  using S = StorageTraits<kStorage>;
  static constexpr int E = S::kWidth;
  Pack<typename S::param_t, E> p;
  Pack<typename S::grad_t, E> g;
  Pack<typename S::moment_t, E> m, v, x;
  std::conditional_t<S::kMaster != MasterKind::kNone, Pack<typename S::master_t, E>, NoPack<typename S::master_t>>
      master;

  C10_HOST_DEVICE C10_ALWAYS_INLINE void load(const RowPointers<kStorage>& a, int64_t i) {
    if constexpr (S::kReadsParam) {
      p = load_pack<E>(a.param + i);
    }
    g = load_pack<E>(a.grad + i);
    m = load_pack<E>(a.exp_avg + i);
    v = load_pack<E>(a.exp_avg_sq + i);
    if constexpr (amsgrad) {
      x = load_pack<E>(a.max_exp_avg_sq + i);
    }
    if constexpr (S::kMaster != MasterKind::kNone) {
      master = load_pack<E>(a.master + i);
    }
  }

  C10_HOST_DEVICE C10_ALWAYS_INLINE void update(const RowCoefficients<typename S::opmath_t>& c,
                                                const GradFactors<typename S::opmath_t>& f, int64_t element) {
#pragma unroll
    for (int k = 0; k < E; ++k) {
      update_element<kStorage, amsgrad>(p[k], g[k], m[k], v[k], &x[k], &master[k], c, f, element + k);
    }
  }

  C10_HOST_DEVICE C10_ALWAYS_INLINE void store(const RowPointers<kStorage>& a, int64_t i) {
    store_pack<E>(a.param + i, p);
    store_pack<E>(a.exp_avg + i, m);
    store_pack<E>(a.exp_avg_sq + i, v);
    if constexpr (amsgrad) {
      store_pack<E>(a.max_exp_avg_sq + i, x);
    }
    if constexpr (S::kMaster != MasterKind::kNone) {
      store_pack<E>(a.master + i, master);
    }
  }
};

}  // inline namespace NOAM_EXT_KERNELS_COPY
}  // namespace noam_ext::cuda_plan

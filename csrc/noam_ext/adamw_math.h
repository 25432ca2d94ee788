// The AdamW update and the hyperparameter table it reads, written once.
//
// Every implementation (the CPU op in csrc/cpu, the CUDA kernel in csrc/cuda,
// the host emulation of the CUDA work split) includes this header and calls
// these functions; no second copy of the update exists anywhere.
//
// The update follows torch.optim.AdamW's single-tensor path term for term,
// including where it rounds its scalar coefficients, so that float32 and
// float64 results agree with PyTorch (see docs/adamw.md and tests/optimizer/test_parity.py).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "schedule_math.h"

namespace noam_ext {

// Columns of the per-group hyperparameter table (float64, [n_groups, kNumHyperColumns])
// that the optimizer hands to the op; exported with their names (kHyperColumnNames) to
// noam_ext/_layout.py, from which Python builds the table.
// amsgrad is not a column: a call either passes max_exp_avg_sqs for every tensor or
// for none, and the optimizer makes one call per (device, dtype, amsgrad).
// Columns come in blocks: AdamW's own settings, then the schedule block. A new block
// goes after the last one, and kNumHyperColumns moves past it.
enum HyperColumn : int {
  kLr = 0,          // base lr of the group (the schedule multiplies it)
  kBeta1 = 1,
  kBeta2 = 2,
  kEps = 3,
  kWeightDecay = 4,
  kMaximize = 5,    // 1.0 or 0.0
  kScheduleBlock = 6,  // kNumScheduleColumns columns: which schedule, and its settings (schedule_math.h)
  kNumHyperColumns = kScheduleBlock + kNumScheduleColumns,
};

constexpr NamedIndex kHyperColumnNames[] = {
    {"lr", kLr}, {"beta1", kBeta1}, {"beta2", kBeta2}, {"eps", kEps}, {"weight_decay", kWeightDecay},
    {"maximize", kMaximize}, {"schedule_block", kScheduleBlock}};

// The learning rate a group uses in the step that follows `schedule_step`
// completed steps. The k-th step() of a scheduled optimizer sees
// schedule_step = k - 1, which is the value LambdaLR's last_epoch has at the
// k-th optimizer.step() of the usual "optimizer.step(); scheduler.step()" loop.
// Without a schedule the factor is exactly 1, and lr * 1.0 is lr.
C10_HOST_DEVICE inline double group_lr(const double* hyper_row, int64_t schedule_step) {
  return hyper_row[kLr] * schedule_factor(hyper_row + kScheduleBlock, static_cast<double>(schedule_step));
}

// What the element update needs, already reduced from (lr, betas, eps,
// weight_decay, step). PyTorch computes these in double on the host and the
// element kernels see them rounded to the math type (float for
// float/bfloat16/half storage, double for double storage); we do the same.
template <typename opmath_t>
struct AdamWCoefficients {
  opmath_t decay;                  // 1 - lr * weight_decay (exactly 1 without decay)
  opmath_t lerp_weight;            // 1 - beta1
  opmath_t beta2;
  opmath_t one_minus_beta2;
  opmath_t bias_correction2_sqrt;  // sqrt(1 - beta2^t)
  opmath_t eps;
  opmath_t neg_step_size;          // -lr / (1 - beta1^t)
};

// `step` is the parameter's step count after this step's increment (t >= 1).
template <typename opmath_t>
C10_HOST_DEVICE inline AdamWCoefficients<opmath_t> make_coefficients(
    double lr, double beta1, double beta2, double eps, double weight_decay, double step) {
  const double bias_correction1 = 1.0 - ::pow(beta1, step);
  const double bias_correction2 = 1.0 - ::pow(beta2, step);
  AdamWCoefficients<opmath_t> c;
  c.decay = static_cast<opmath_t>(1.0 - lr * weight_decay);
  c.lerp_weight = static_cast<opmath_t>(1.0 - beta1);
  c.beta2 = static_cast<opmath_t>(beta2);
  c.one_minus_beta2 = static_cast<opmath_t>(1.0 - beta2);
  // PyTorch writes bias_correction2 ** 0.5, i.e. pow(x, 0.5); keep it.
  c.bias_correction2_sqrt = static_cast<opmath_t>(::pow(bias_correction2, 0.5));
  c.eps = static_cast<opmath_t>(eps);
  c.neg_step_size = static_cast<opmath_t>(-(lr / bias_correction1));
  return c;
}

// The coefficients of one parameter for this step, from its group's row of the
// hyperparameter table, the schedule's completed steps and the parameter's own
// step count before this step (torch increments a float32 step, then reads it).
template <typename opmath_t>
C10_HOST_DEVICE inline AdamWCoefficients<opmath_t> coefficients_for(
    const double* hyper_row, int64_t schedule_step, float param_step_before) {
  const double lr = group_lr(hyper_row, schedule_step);
  const double step = static_cast<double>(param_step_before + 1.0f);
  return make_coefficients<opmath_t>(lr, hyper_row[kBeta1], hyper_row[kBeta2], hyper_row[kEps],
                                     hyper_row[kWeightDecay], step);
}

// sqrt, fused multiply-add (one rounding) and a NaN-propagating max for the
// value type the update runs on.
// Scalars are specialised here; vector types (at::vec::Vectorized on the CPU)
// are specialised next to the code that uses them.
template <typename T>
struct MathOps;

template <>
struct MathOps<float> {
  C10_HOST_DEVICE static float sqrt(float x) { return ::sqrtf(x); }
  C10_HOST_DEVICE static float fmadd(float a, float b, float c) { return ::fmaf(a, b, c); }
  // torch.maximum propagates NaN from either side.
  C10_HOST_DEVICE static float maximum(float a, float b) { return (a != a || a > b) ? a : b; }
};

template <>
struct MathOps<double> {
  C10_HOST_DEVICE static double sqrt(double x) { return ::sqrt(x); }
  C10_HOST_DEVICE static double fmadd(double a, double b, double c) { return ::fma(a, b, c); }
  C10_HOST_DEVICE static double maximum(double a, double b) { return (a != a || a > b) ? a : b; }
};

// The gradient an update uses: divided by GradScaler's scale, then multiplied by
// the clipping factor (FusedAdamW.clip_grad_norm_), as torch unscales and then
// clips; each in the math type, one rounding each, and only when given.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T unscaled_clipped_grad(T grad, bool unscale, const T& divisor, bool clip,
                                                         const T& multiplier) {
  if (unscale) {
    grad = grad / divisor;
  }
  if (clip) {
    grad = grad * multiplier;
  }
  return grad;
}

// One AdamW step on one element (T = float or double) or one vector of
// elements (T = at::vec::Vectorized<float/double>), in PyTorch's order:
//   g  = maximize ? -g : g
//   p  = p * (1 - lr*wd)                           decoupled weight decay
//   m  = lerp(m, g, 1 - beta1)                     first moment
//   v  = v * beta2 + (1 - beta2) * g * g           second moment
//   vm = max(vm, v)                                amsgrad only; vm replaces v below
//   p  = p + (-lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps)
// Rounding follows what torch.optim.AdamW's kernels do on both devices (measured
// in tests/optimizer/test_parity.py, explained in docs/adamw.md): the lerp is one fused
// multiply-add, fma(w, g - m, m), as torch.lerp's vectorised CPU kernel and its
// CUDA kernel compute it; the second moment is fma((1-beta2)*g, g, beta2*v), as
// PyTorch's compiled addcmul_ evaluates it. Every other operation rounds on its own.
template <bool amsgrad, typename T, typename opmath_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void adamw_update(
    T& param, T grad, T& exp_avg, T& exp_avg_sq, T* max_exp_avg_sq,
    const AdamWCoefficients<opmath_t>& c, bool maximize) {
  using Ops = MathOps<T>;
  if (maximize) {
    grad = -grad;
  }
  param = param * T(c.decay);
  // torch.lerp(start, end, w): fma(w, end - start, start) for |w| < 0.5,
  // fma(w - 1, end - start, end) otherwise (better accuracy near w = 1).
  if (c.lerp_weight < opmath_t(0.5)) {
    exp_avg = Ops::fmadd(T(c.lerp_weight), grad - exp_avg, exp_avg);
  } else {
    exp_avg = Ops::fmadd(T(c.lerp_weight - opmath_t(1)), grad - exp_avg, grad);
  }
  exp_avg_sq = Ops::fmadd(T(c.one_minus_beta2) * grad, grad, exp_avg_sq * T(c.beta2));
  T second_moment = exp_avg_sq;
  if constexpr (amsgrad) {
    *max_exp_avg_sq = Ops::maximum(*max_exp_avg_sq, exp_avg_sq);
    second_moment = *max_exp_avg_sq;
  }
  const T denom = Ops::sqrt(second_moment) / T(c.bias_correction2_sqrt) + T(c.eps);
  param = param + T(c.neg_step_size) * exp_avg / denom;
}

// ---- Storing in 16 bits: master remainders and stochastic rounding ------------------------
// (FusedAdamW's low-byte options; docs/adamw.md, "Fewer bytes per parameter".) Integer
// operations only, so every implementation gets the same bits.

C10_HOST_DEVICE inline uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

C10_HOST_DEVICE inline float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

C10_HOST_DEVICE inline bool bits_are_nan(uint32_t u) {
  return (u & 0x7FFFFFFFu) > 0x7F800000u;
}

// A float32 master as a bfloat16 parameter and a 16-bit remainder that together rebuild
// it exactly (TransformerEngine's "param remainders"). The parameter is the master
// rounded to nearest with ties away from zero: round-to-even would need a 17th bit at
// exact ties (a bfloat16 value has 65537 float32 values that round to it when its last
// bit is even), so both master forms round this way and agree bit for bit. A NaN master
// gives a NaN parameter and remainder 0 (its payload is not kept).
struct MasterSplit {
  uint16_t param_bits;
  int16_t remainder;
};

C10_HOST_DEVICE inline MasterSplit split_master(float master) {
  const uint32_t m = float_bits(master);
  if (bits_are_nan(m)) {
    return {static_cast<uint16_t>((m >> 16) | 0x0040u), 0};
  }
  const uint32_t rounded = (m + 0x8000u) & 0xFFFF0000u;   // carries into the magnitude at lo >= 0x8000
  return {static_cast<uint16_t>(rounded >> 16), static_cast<int16_t>(static_cast<uint16_t>(m - rounded))};
}

C10_HOST_DEVICE inline float join_master(uint16_t param_bits, int16_t remainder) {
  return bits_float((static_cast<uint32_t>(param_bits) << 16) + static_cast<uint32_t>(static_cast<int32_t>(remainder)));
}

// The bfloat16 a float32 master writes to its parameter, as a float (exactly representable).
C10_HOST_DEVICE inline float master_to_bfloat16_value(float master) {
  const uint32_t m = float_bits(master);
  return bits_are_nan(m) ? master : bits_float((m + 0x8000u) & 0xFFFF0000u);
}

// Stochastic rounding's random bits: a counter-based generator, a pure function of a key
// and an element's index, so the bits depend on neither threads, blocks nor launches.
// The key hashes the parameter's stream (its optimizer seed and place, and for a shard
// where that is needed, the shard), its step count, which pair of tensors it rounds, and
// the high 32 bits of the index; the bits hash the key with the low 32 bits.
C10_HOST_DEVICE inline uint64_t mix64(uint64_t x) {   // splitmix64's finaliser
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBull;
  x ^= x >> 31;
  return x;
}

C10_HOST_DEVICE inline uint32_t mix32(uint32_t x) {   // "lowbias32", a well-mixing bijection
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// Which pair of tensors a key rounds: the parameter (low 16 bits) and exp_avg (high 16
// bits) share one draw, exp_avg_sq (low) and max_exp_avg_sq (high) another.
enum RoundingPair : uint32_t { kParamAndExpAvg = 0, kExpAvgSqAndMax = 1 };

C10_HOST_DEVICE inline uint32_t rounding_key(uint64_t stream, float step, uint32_t pair, uint32_t index_high) {
  const uint64_t h = mix64(stream ^ mix64(static_cast<uint64_t>(step) * 4 + pair) ^
                           (static_cast<uint64_t>(index_high) << 32));
  return static_cast<uint32_t>(h ^ (h >> 32));
}

C10_HOST_DEVICE inline uint32_t rounding_bits(uint32_t key, uint32_t index_low) {
  return mix32(index_low * 0x9E3779B9u + key);
}

// x rounded to a bfloat16 value stochastically: up in magnitude with probability
// (the dropped low 16 bits) / 2**16, so the expected result is x. `random16` is 16
// random bits. Returned as a float that bfloat16 represents exactly; a NaN is returned
// as is, for the conversion to make a bfloat16 NaN of it.
C10_HOST_DEVICE inline float stochastic_bfloat16_value(float x, uint32_t random16) {
  const uint32_t m = float_bits(x);
  return bits_are_nan(m) ? x : bits_float((m + (random16 & 0xFFFFu)) & 0xFFFF0000u);
}

}  // namespace noam_ext

// The AdamW update and the hyperparameter table it reads, written once.
//
// Every implementation (the CPU op in csrc/cpu, the CUDA kernel in csrc/cuda,
// the host emulation of the CUDA work split) includes this header and calls
// these functions; no second copy of the update exists anywhere.
//
// The update follows torch.optim.AdamW's single-tensor path term for term,
// including where it rounds its scalar coefficients, so that float32 and
// float64 results agree with PyTorch (see docs/adamw.md and tests/test_parity.py).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "schedule_math.h"

namespace noam_ext {

// Columns of the per-group hyperparameter table (float64, [n_groups, kNumHyperColumns])
// that the optimizer hands to the op. Keep in sync with noam_ext/_hyper.py.
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
// in tests/test_parity.py, explained in docs/adamw.md): the lerp is one fused
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

}  // namespace noam_ext

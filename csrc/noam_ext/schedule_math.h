// The learning-rate schedules the op evaluates itself, written once.
//
// The CPU op, the CUDA prepare kernel and its host emulation all reach these
// through group_lr() (adamw_math.h): once per (group, step) on the CPU, once per
// tensor in the CUDA prepare pass, never per element.
//
// Each factor is the same double expression, in the same order and with the
// same libm functions (cos, sqrt, pow), as its Python twin in noam_ext/schedules.py,
// so that on the CPU the op's lr and the twin's agree bit for bit. The formulas,
// and the reference each one follows, are in docs/adamw.md.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace noam_ext {

// Offsets in the schedule block of a hyperparameter row (adamw_math.h,
// kScheduleBlock), exported with their names below (noam_ext/_layout.py). A kind reads only
// the settings it needs; the others are 0.
enum ScheduleColumn : int {
  kScheduleKind = 0,  // ScheduleKind
  kWarmupSteps = 1,   // all kinds: the linear ramp covers steps [0, warmup)
  kDecayStart = 2,    // linear, cosine: warmup; WSD: warmup + stable (the first decaying step)
  kDecayEnd = 3,      // linear, cosine: total steps; WSD: warmup + stable + decay (the first step at the floor)
  kMinLrRatio = 4,    // the floor, as a fraction of the base lr
  kDecayShape = 5,    // WSD: DecayShape
  kNumCycles = 6,     // cosine: waves over the decay (0.5: one half-cosine from 1 to the floor)
  kTimescale = 7,     // inverse square root
  kDModel = 8,        // Noam
  kNumScheduleColumns = 9,
};

enum ScheduleKind : int {
  kNoSchedule = 0,  // the row's lr is used as is
  kNoam = 1,
  kWarmupConstant = 2,
  kWarmupLinear = 3,
  kWarmupCosine = 4,
  kWarmupStableDecay = 5,
  kWarmupInverseSqrt = 6,
};

enum DecayShape : int {
  kDecayLinear = 0,
  kDecayCosine = 1,
  kDecayOneMinusSqrt = 2,
  kDecayExponential = 3,
};

// The names of the enums above, for noam_ext._C.table_layout(): Python builds its table
// rows from that, so the layout is written here only (noam_ext/_layout.py).
struct NamedIndex {
  const char* name;
  int index;
};

constexpr NamedIndex kScheduleColumnNames[] = {
    {"kind", kScheduleKind}, {"warmup_steps", kWarmupSteps}, {"decay_start", kDecayStart},
    {"decay_end", kDecayEnd}, {"min_lr_ratio", kMinLrRatio}, {"decay_shape", kDecayShape},
    {"num_cycles", kNumCycles}, {"timescale", kTimescale}, {"d_model", kDModel}};
constexpr NamedIndex kScheduleKindNames[] = {
    {"none", kNoSchedule}, {"noam", kNoam}, {"warmup_constant", kWarmupConstant}, {"warmup_linear", kWarmupLinear},
    {"warmup_cosine", kWarmupCosine}, {"warmup_stable_decay", kWarmupStableDecay},
    {"warmup_inverse_sqrt", kWarmupInverseSqrt}};
constexpr NamedIndex kDecayShapeNames[] = {
    {"linear", kDecayLinear}, {"cosine", kDecayCosine}, {"1-sqrt", kDecayOneMinusSqrt},
    {"exponential", kDecayExponential}};

// Python's math.pi: the same double.
constexpr double kPi = 3.141592653589793;

// The Noam factor of "Attention Is All You Need":
//   d_model^-0.5 * min(s^-0.5, s * warmup^-1.5),  s = max(step, 1).
// Evaluated with pow() in double exactly as Python evaluates the same
// expression, so the host result is bit-identical to noam_ext.noam_lr().
C10_HOST_DEVICE inline double noam_lambda(double step, double d_model, double warmup) {
  const double s = step < 1.0 ? 1.0 : step;
  const double decay = ::pow(s, -0.5);
  const double ramp = s * ::pow(warmup, -1.5);
  return ::pow(d_model, -0.5) * (decay < ramp ? decay : ramp);
}

// A factor f in [0, 1] lifted onto [floor, 1], as HF writes it (f * (1 - m) + m).
C10_HOST_DEVICE inline double above_floor(double f, double floor) {
  return f * (1.0 - floor) + floor;
}

// HF's cosine: 0.5 * (1 + cos(pi * cycles * 2 * progress)), multiplied left to right.
C10_HOST_DEVICE inline double cosine_wave(double progress, double cycles) {
  return 0.5 * (1.0 + ::cos(kPi * cycles * 2.0 * progress));
}

// WSD's decay from 1 at progress 0 to 0 at progress 1.
C10_HOST_DEVICE inline double wsd_decay(int shape, double progress) {
  switch (shape) {
    case kDecayCosine:
      return cosine_wave(progress, 0.5);
    case kDecayOneMinusSqrt:
      return 1.0 - ::sqrt(progress);
    case kDecayExponential:  // Megatron-LM's: 2 * 0.5^progress - 1
      return 2.0 * ::pow(0.5, progress) - 1.0;
    default:  // kDecayLinear
      return 1.0 - progress;
  }
}

// The multiplier of the base lr after `step` completed steps, from the row's
// schedule block. Steps are whole numbers below 2**53, so every difference of
// steps below is exact; only the divisions, cos, sqrt and pow round.
C10_HOST_DEVICE inline double schedule_factor(const double* block, double step) {
  const int kind = static_cast<int>(block[kScheduleKind]);
  if (kind == kNoSchedule) {
    return 1.0;
  }
  const double warmup = block[kWarmupSteps];
  if (kind == kNoam) {
    return noam_lambda(step, block[kDModel], warmup);
  }
  const double floor = block[kMinLrRatio];
  if (step < warmup) {
    // From 0 at the first step (HF, Megatron-LM); HF's WSD ramps from its floor.
    const double ramp = step / warmup;
    return kind == kWarmupStableDecay ? above_floor(ramp, floor) : ramp;
  }
  const double start = block[kDecayStart];
  const double end = block[kDecayEnd];
  switch (kind) {
    case kWarmupLinear:  // HF: (total - step) / (total - warmup), one division
      return step < end ? above_floor((end - step) / (end - start), floor) : floor;
    case kWarmupCosine:
      return step < end ? above_floor(cosine_wave((step - start) / (end - start), block[kNumCycles]), floor)
                        : floor;
    case kWarmupStableDecay:
      if (step < start) {
        return 1.0;
      }
      return step < end
                 ? above_floor(wsd_decay(static_cast<int>(block[kDecayShape]), (step - start) / (end - start)), floor)
                 : floor;
    case kWarmupInverseSqrt: {  // HF: 1 / sqrt((step + timescale - warmup) / timescale)
      const double timescale = block[kTimescale];
      const double decay = 1.0 / ::sqrt((step + (timescale - warmup)) / timescale);
      return decay < floor ? floor : decay;
    }
    default:  // kWarmupConstant
      return 1.0;
  }
}

}  // namespace noam_ext

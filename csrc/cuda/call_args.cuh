// What one call's launches read (KernelArgs, passed by value), what the prepare launch
// works out per row for the update launch (RowCoefficients), and the prepare pass itself.
#pragma once

#include "kernels_namespace.h"

#include <c10/macros/Macros.h>

#include <cstdint>

#include "../noam_ext/adamw_math.h"
#include "../noam_ext/work_split.h"
#include "launch_policy.cuh"

namespace noam_ext::cuda_plan {
inline namespace NOAM_EXT_KERNELS_COPY {

// What the prepare pass computes for a row and the update pass reads.
template <typename opmath_t>
struct alignas(16) RowCoefficients {
  AdamWCoefficients<opmath_t> coefficients;
  int32_t maximize;
  int32_t vector_head;          // vector_head_elements() of the row
  // Stochastic rounding (adamw_math.h): the keys of the row's two draws for the high 32
  // bits `key_index_high` of its elements' indices, and what other high bits need.
  int32_t stochastic_rounding;
  uint32_t key_param_and_exp_avg;
  uint32_t key_exp_avg_sq_and_max;
  uint32_t key_index_high;
  float rounding_step;          // the parameter's step count after this step
  uint64_t rng_stream;
  int64_t element_offset;
};

// Everything both launches need; passed by value. The tables live in memory the
// kernels can read (device memory for the GPU, host memory for the emulation), so
// a call may hold any number of tensors and of param groups.
struct KernelArgs {
  const TensorRow* rows;
  const StridedLayout* layouts;  // of the rows whose layout is not -1
  int64_t num_rows;
  int64_t total;                 // length of the virtual index space
  const double* hyper;           // [groups, kNumHyperColumns] (adamw_math.h)
  int64_t* schedule_step;        // [0] completed steps: read by prepare, advanced by update
  const float* grad_scale;       // null: no AMP scaling
  const float* found_inf;        // null: never skip
  const double* grad_clip;       // null: no clipping factor
  void* coefficients;            // [num_rows] RowCoefficients<opmath_t>: prepare writes, update reads
  int64_t chunk_elements;        // elements per chunk of the update launch (update_chunk_elements)
  int8_t element_sizes[kRowTensors];   // bytes per element of each of a row's tensors (work_split.h's
                                       // RowTensor order; 0: the storage has no master)
  bool advance_schedule;
  bool stochastic_rounding;
};

C10_HOST_DEVICE inline bool step_skipped(const KernelArgs& a) {
  return a.found_inf != nullptr && *a.found_inf != 0.0f;
}

// Where a row's 16-byte vectors start, in elements: -1 for the element path (a strided
// row, or pointers that no number of leading elements brings to a 16-byte boundary
// together), otherwise the fewest leading elements after which every pointer of the row
// is 16-byte aligned (0 when all are). A step is 16 bytes of the narrowest tensor and so
// whole 16-byte vectors of each wider one: from there on every step is aligned in all of
// them. That covers views that start at the same element of equally aligned buffers,
// whatever their element sizes (a bfloat16 parameter and float32 moments one element
// into flat buffers: 7 elements, then vectors). A part of the row starting at a
// multiple of kRowAlignElements elements has the same head.
C10_HOST_DEVICE inline int32_t vector_head_elements(const TensorRow& r, const int8_t* element_sizes) {
  if (r.layout >= 0) {
    return -1;
  }
  const void* const pointers[kRowTensors] = {r.param, r.grad, r.exp_avg, r.exp_avg_sq, r.max_exp_avg_sq, r.master};
  int32_t narrowest = kVecBytes;
  for (int t = 0; t < kRowTensors; ++t) {
    if (pointers[t] != nullptr && element_sizes[t] > 0 && element_sizes[t] < narrowest) {
      narrowest = element_sizes[t];
    }
  }
  for (int32_t head = 0; head < kVecBytes / narrowest; ++head) {
    bool aligned = true;
    for (int t = 0; t < kRowTensors; ++t) {
      if (pointers[t] != nullptr && element_sizes[t] > 0) {
        aligned = aligned && (reinterpret_cast<uintptr_t>(pointers[t]) + static_cast<uintptr_t>(head) *
                              static_cast<uintptr_t>(element_sizes[t])) % kVecBytes == 0;
      }
    }
    if (aligned) {
      return head;
    }
  }
  return -1;
}

// Prepare pass, row i: its coefficients from the step counts before this step,
// then its step count advanced (torch increments state["step"] before it reads it
// for the bias corrections; coefficients_for adds the 1 itself). Rows are
// independent: each has its own step tensor (one call never holds one twice).
template <typename opmath_t>
C10_HOST_DEVICE inline void prepare_row(const KernelArgs& a, int64_t i) {
  const TensorRow& row = a.rows[i];
  const double* hyper = a.hyper + static_cast<int64_t>(row.group) * kNumHyperColumns;
  RowCoefficients<opmath_t> out;
  out.coefficients = coefficients_for<opmath_t>(hyper, *a.schedule_step, *row.step);
  out.maximize = hyper[kMaximize] != 0.0;
  out.vector_head = vector_head_elements(row, a.element_sizes);
  out.stochastic_rounding = a.stochastic_rounding ? 1 : 0;
  out.rounding_step = *row.step + 1.0f;
  out.rng_stream = row.rng_stream;
  out.element_offset = row.element_offset;
  out.key_index_high = static_cast<uint32_t>(static_cast<uint64_t>(row.element_offset) >> 32);
  out.key_param_and_exp_avg = rounding_key(row.rng_stream, out.rounding_step, kParamAndExpAvg, out.key_index_high);
  out.key_exp_avg_sq_and_max = rounding_key(row.rng_stream, out.rounding_step, kExpAvgSqAndMax, out.key_index_high);
  static_cast<RowCoefficients<opmath_t>*>(a.coefficients)[i] = out;
  if (!step_skipped(a)) {
    *row.step += 1.0f;
  }
}

// The schedule counts optimizer steps, skipped ones too (as the CPU op). Done by
// one thread of the update launch: the prepare launch, which reads it, has finished.
C10_HOST_DEVICE inline void advance_schedule_counter(const KernelArgs& a) {
  if (a.advance_schedule) {
    a.schedule_step[0] += 1;
  }
}

// What every gradient is divided by (GradScaler's scale) and then multiplied by
// (the clipping factor), in the math type; the flags say whether to at all.
template <typename opmath_t>
struct GradFactors {
  opmath_t divisor;
  opmath_t multiplier;
  bool unscale;
  bool clip;
};

template <typename opmath_t>
C10_HOST_DEVICE inline GradFactors<opmath_t> grad_factors(const KernelArgs& a) {
  GradFactors<opmath_t> f;
  f.unscale = a.grad_scale != nullptr;
  f.divisor = f.unscale ? static_cast<opmath_t>(*a.grad_scale) : opmath_t(1);
  f.clip = a.grad_clip != nullptr;
  f.multiplier = f.clip ? static_cast<opmath_t>(*a.grad_clip) : opmath_t(1);
  return f;
}

// Calls f(begin, end) for each chunk [begin, end) of the virtual index space that the
// calling block takes: chunks of a.chunk_elements, grid-stride. Walked by their first element
// (fewer live registers than a chunk index and a count: the update kernels are compiled at
// their register budget). Exec: run_block's (multi_tensor_walk.cuh).
template <typename Exec, typename F>
C10_HOST_DEVICE C10_ALWAYS_INLINE void for_each_chunk_of_block(const KernelArgs& a, const Exec& exec, F&& f) {
  const int64_t chunk_elements = a.chunk_elements;
  const int64_t stride = chunk_elements * exec.num_blocks();
  for (int64_t begin = chunk_elements * exec.block(); begin < a.total; begin += stride) {
    f(begin, begin + chunk_elements < a.total ? begin + chunk_elements : a.total);
  }
}

}  // inline namespace NOAM_EXT_KERNELS_COPY
}  // namespace noam_ext::cuda_plan

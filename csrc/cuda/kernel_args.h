// Host side of a fused_adamw_ launch, shared by the CUDA op (adamw_cuda.cu) and
// its host emulation (tests/host_run/host_run.cpp): packing the call into KernelArgs.
#pragma once

#include "kernels_namespace.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>

#include "../noam_ext/run_rows.h"
#include "call_args.cuh"

namespace noam_ext::cuda_plan {
inline namespace NOAM_EXT_KERNELS_COPY {

// The tables must lie where the kernels can read them (device memory for the GPU,
// host memory for the emulation): `rows` [num_rows], `layouts` (the strided rows'),
// `hyper` [groups, columns], and `coefficients`, room for num_rows RowCoefficients of
// the call's math type.
inline KernelArgs make_kernel_args(const RowsCall& call, int64_t chunk_elements, const TensorRow* rows,
                                   const StridedLayout* layouts, const double* hyper, void* coefficients) {
  KernelArgs a{};
  a.rows = rows;
  a.layouts = layouts;
  a.num_rows = static_cast<int64_t>(call.rows.size());
  a.total = call.total;
  a.hyper = hyper;
  a.coefficients = coefficients;
  a.schedule_step = call.schedule_step.data_ptr<int64_t>();
  a.grad_scale = call.grad_scale ? call.grad_scale->data_ptr<float>() : nullptr;
  a.found_inf = call.found_inf ? call.found_inf->data_ptr<float>() : nullptr;
  a.grad_clip = call.grad_clip ? call.grad_clip->data_ptr<double>() : nullptr;
  const auto size = [](c10::ScalarType t) { return static_cast<int8_t>(c10::elementSize(t)); };
  const int8_t moment = size(call.storage.moment);
  const int8_t master = call.storage.master == MasterKind::kNone ? 0 : size(master_dtype(call.storage.master));
  const int8_t sizes[kRowTensors] = {size(call.storage.param), size(call.storage.grad), moment, moment, moment, master};
  std::copy(sizes, sizes + kRowTensors, a.element_sizes);
  a.chunk_elements = chunk_elements;   // step_launches' choice for the call
  a.advance_schedule = call.advance_schedule;
  a.stochastic_rounding = call.stochastic_rounding;
  return a;
}

// Bytes of per-row coefficients a call needs (the widest math type: double).
inline size_t coefficient_bytes(int64_t num_rows) {
  return static_cast<size_t>(num_rows) * sizeof(RowCoefficients<double>);
}

}  // inline namespace NOAM_EXT_KERNELS_COPY
}  // namespace noam_ext::cuda_plan

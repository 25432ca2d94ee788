// Host side of a fused_adamw_ launch, shared by the CUDA op (adamw_cuda.cu) and
// its host emulation (csrc/cpu/cuda_emulation.cpp): packing the call into
// KernelArgs, and choosing the storage type.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "fused_adamw_plan.h"

namespace noam_ext::cuda_plan {

// The tables must lie where the kernels can read them (device memory for the GPU,
// host memory for the emulation): `rows` [num_rows], `hyper` [groups, columns],
// and `coefficients`, room for num_rows RowCoefficients of the call's math type.
inline KernelArgs make_kernel_args(const TensorRow* rows, int64_t num_rows, int64_t total, const double* hyper,
                                   void* coefficients, const at::Tensor& schedule_step, bool advance_schedule,
                                   const std::optional<at::Tensor>& grad_scale,
                                   const std::optional<at::Tensor>& found_inf,
                                   const std::optional<at::Tensor>& grad_clip) {
  KernelArgs a{};
  a.rows = rows;
  a.num_rows = num_rows;
  a.total = total;
  a.hyper = hyper;
  a.coefficients = coefficients;
  a.schedule_step = schedule_step.data_ptr<int64_t>();
  a.grad_scale = grad_scale ? grad_scale->data_ptr<float>() : nullptr;
  a.found_inf = found_inf ? found_inf->data_ptr<float>() : nullptr;
  a.grad_clip = grad_clip ? grad_clip->data_ptr<double>() : nullptr;
  a.advance_schedule = advance_schedule;
  return a;
}

// Bytes of per-row coefficients a call needs (the widest math type: double).
inline size_t coefficient_bytes(int64_t num_rows) {
  return static_cast<size_t>(num_rows) * sizeof(RowCoefficients<double>);
}

// Calls f(scalar_t{}) with the storage type of a call's tensors.
template <typename F>
void dispatch_storage_type(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK(false, "fused_adamw_: unsupported dtype ", dtype);
  }
}

}  // namespace noam_ext::cuda_plan

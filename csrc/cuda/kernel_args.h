// Host side of a fused_adamw_ launch, shared by the CUDA op (adamw_cuda.cu) and
// its host emulation (csrc/cpu/cuda_emulation.cpp): packing the call into
// KernelArgs, and choosing the storage type.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>

#include "fused_adamw_plan.h"

namespace noam_ext::cuda_plan {

// `rows` must point at memory the kernel can read (device memory for the GPU,
// the host table for the emulation).
inline KernelArgs make_kernel_args(const TensorRow* rows, int64_t num_rows, int64_t total, bool amsgrad,
                                   const at::Tensor& schedule_step, const at::Tensor& hyper,
                                   bool advance_schedule, const std::optional<at::Tensor>& grad_scale,
                                   const std::optional<at::Tensor>& found_inf,
                                   const std::optional<at::Tensor>& grad_clip) {
  TORCH_CHECK(hyper.size(0) <= kMaxGroups, "fused_adamw_: the CUDA kernel takes at most ", kMaxGroups,
              " param groups per (device, dtype), got ", hyper.size(0));
  KernelArgs a{};
  a.rows = rows;
  a.num_rows = num_rows;
  a.total = total;
  a.schedule_step = schedule_step.data_ptr<int64_t>();
  a.grad_scale = grad_scale ? grad_scale->data_ptr<float>() : nullptr;
  a.found_inf = found_inf ? found_inf->data_ptr<float>() : nullptr;
  a.grad_clip = grad_clip ? grad_clip->data_ptr<double>() : nullptr;
  a.amsgrad = amsgrad;
  a.advance_schedule = advance_schedule;
  const double* values = hyper.data_ptr<double>();
  std::copy(values, values + hyper.numel(), &a.hyper.rows[0][0]);
  return a;
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

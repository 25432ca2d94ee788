// Host side of a fused_adamw_ launch, shared by the CUDA op (adamw_cuda.cu) and
// its host emulation (csrc/cpu/cuda_emulation.cpp): packing the op's tensors
// into KernelArgs, and choosing the storage type.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>

#include "fused_adamw_plan.h"

namespace noam_ext::cuda_plan {

template <typename scalar_t>
KernelArgs<scalar_t> make_kernel_args(
    const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
    const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& max_exp_avg_sq,
    const at::Tensor& param_steps, const at::Tensor& schedule_step, const at::Tensor& segments,
    const at::Tensor& hyper, const std::optional<at::Tensor>& active,
    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  TORCH_CHECK(hyper.size(0) <= kMaxGroups, "fused_adamw_: the CUDA kernel takes at most ", kMaxGroups,
              " param groups per flat buffer, got ", hyper.size(0));
  KernelArgs<scalar_t> a{};
  a.param = param.data_ptr<scalar_t>();
  a.grad = grad.data_ptr<scalar_t>();
  a.exp_avg = exp_avg.data_ptr<scalar_t>();
  a.exp_avg_sq = exp_avg_sq.data_ptr<scalar_t>();
  a.max_exp_avg_sq = max_exp_avg_sq ? max_exp_avg_sq->data_ptr<scalar_t>() : nullptr;
  a.param_steps = param_steps.data_ptr<float>();
  a.schedule_step = schedule_step.data_ptr<int64_t>();
  a.segments = reinterpret_cast<const Segment*>(segments.data_ptr<int64_t>());
  a.active = active ? active->data_ptr<bool>() : nullptr;
  a.grad_scale = grad_scale ? grad_scale->data_ptr<float>() : nullptr;
  a.found_inf = found_inf ? found_inf->data_ptr<float>() : nullptr;
  a.num_segments = segments.size(0);
  a.total = param.numel();
  const double* rows = hyper.data_ptr<double>();
  std::copy(rows, rows + hyper.numel(), &a.hyper.rows[0][0]);
  return a;
}

// Calls f(scalar_t{}) with the storage type of a flat buffer.
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

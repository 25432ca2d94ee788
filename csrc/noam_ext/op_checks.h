// Argument checks shared by every implementation of noam_ext::fused_adamw_.
// The Python optimizer validates what users pass; these catch a caller that
// builds the op's arguments by hand, before any memory is touched.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "adamw_math.h"

namespace noam_ext {

inline void check_fused_adamw_args(
    const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
    const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& max_exp_avg_sq,
    const at::Tensor& param_steps, const at::Tensor& schedule_step, const at::Tensor& segments,
    const at::Tensor& hyper, const std::optional<at::Tensor>& active,
    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const auto device = param.device();
  const auto dtype = param.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "fused_adamw_: param must be float32, float64, bfloat16 or float16, got ", dtype);
  auto check_flat = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == device, "fused_adamw_: ", name, " is on ", t.device(),
                " but param is on ", device);
    TORCH_CHECK(t.scalar_type() == dtype, "fused_adamw_: ", name, " has dtype ", t.scalar_type(),
                " but param has ", dtype);
    TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), "fused_adamw_: ", name,
                " must be a contiguous 1-D flat buffer");
    TORCH_CHECK(t.numel() == param.numel(), "fused_adamw_: ", name, " has ", t.numel(),
                " elements but param has ", param.numel());
  };
  check_flat(param, "param");
  check_flat(grad, "grad");
  check_flat(exp_avg, "exp_avg");
  check_flat(exp_avg_sq, "exp_avg_sq");
  if (max_exp_avg_sq) {
    check_flat(*max_exp_avg_sq, "max_exp_avg_sq");
  }
  TORCH_CHECK(segments.scalar_type() == at::kLong && segments.dim() == 2 && segments.size(1) == 3 &&
                  segments.is_contiguous() && segments.device() == device,
              "fused_adamw_: segments must be a contiguous int64 [n, 3] tensor on ", device);
  const int64_t n = segments.size(0);
  TORCH_CHECK(param_steps.scalar_type() == at::kFloat && param_steps.dim() == 1 &&
                  param_steps.numel() == n && param_steps.is_contiguous() &&
                  param_steps.device() == device,
              "fused_adamw_: param_steps must be a contiguous float32 [", n, "] tensor on ", device);
  TORCH_CHECK(schedule_step.scalar_type() == at::kLong && schedule_step.numel() == 1 &&
                  schedule_step.device() == device,
              "fused_adamw_: schedule_step must be a one-element int64 tensor on ", device);
  TORCH_CHECK(hyper.scalar_type() == at::kDouble && hyper.dim() == 2 &&
                  hyper.size(1) == kNumHyperColumns && hyper.is_contiguous() && hyper.is_cpu(),
              "fused_adamw_: hyper must be a contiguous float64 [groups, ", int(kNumHyperColumns),
              "] CPU tensor");
  const double* rows = hyper.data_ptr<double>();
  for (int64_t g = 0; g < hyper.size(0); ++g) {
    TORCH_CHECK(rows[g * kNumHyperColumns + kAmsgrad] == 0.0 || max_exp_avg_sq.has_value(),
                "fused_adamw_: group ", g, " uses amsgrad but max_exp_avg_sq was not given");
  }
  if (active) {
    TORCH_CHECK(active->scalar_type() == at::kBool && active->numel() == n &&
                    active->is_contiguous() && active->device() == device,
                "fused_adamw_: active must be a contiguous bool [", n, "] tensor on ", device);
  }
  for (const auto* t : {&grad_scale, &found_inf}) {
    if (t->has_value()) {
      TORCH_CHECK((*t)->numel() == 1 && (*t)->scalar_type() == at::kFloat && (*t)->device() == device,
                  "fused_adamw_: grad_scale and found_inf must be one-element float32 tensors on ",
                  device);
    }
  }
}

}  // namespace noam_ext

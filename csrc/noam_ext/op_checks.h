// Argument checks shared by every implementation of noam_ext::fused_adamw_.
// The Python optimizer validates what users pass; these catch a caller that
// builds the op's arguments by hand, before any memory is touched.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "adamw_math.h"
#include "work_split.h"

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
    // The CUDA kernel's 16-byte vector accesses need aligned buffers (the optimizer's are).
    TORCH_CHECK(!t.is_cuda() || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "fused_adamw_: ", name,
                " must start on a 16-byte boundary");
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
  TORCH_CHECK(schedule_step.scalar_type() == at::kLong && schedule_step.numel() == 2 &&
                  schedule_step.is_contiguous() && schedule_step.device() == device,
              "fused_adamw_: schedule_step must be a two-element int64 tensor on ", device,
              " (completed steps, and a zeroed counter the CUDA kernel uses within a launch)");
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

// Segments in order, inside the buffers, naming existing groups. Needs the
// table on the host: the CPU op and the host emulation call it on every call;
// the CUDA op relies on the optimizer, which checks its table once when built.
inline void check_segments(const Segment* segments, int64_t n, int64_t total, int64_t n_groups) {
  for (int64_t i = 0; i < n; ++i) {
    const Segment& s = segments[i];
    TORCH_CHECK(s.offset >= 0 && s.numel >= 0 && s.offset + s.numel <= total &&
                    (i == 0 || s.offset >= segments[i - 1].offset + segments[i - 1].numel),
                "fused_adamw_: segment ", i, " (offset ", s.offset, ", numel ", s.numel,
                ") is out of order or outside the ", total, "-element buffers");
    TORCH_CHECK(s.group >= 0 && s.group < n_groups, "fused_adamw_: segment ", i, " names group ",
                s.group, " but there are ", n_groups);
  }
}

}  // namespace noam_ext

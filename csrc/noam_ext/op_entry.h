// The body every device's registered fused_adamw_ shares: check the call, build
// its rows, and hand them to that device's run_rows. Everything is checked before
// anything is written, so a failed call changes nothing.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "op_checks.h"
#include "run_rows.h"

namespace noam_ext {

using RunRows = void (*)(const RowsCall&);

// `run` is called with the checked call: a device's run_rows, or the host
// emulation of the CUDA kernels (csrc/cpu/cuda_emulation.cpp).
template <typename Run>
void checked_fused_adamw(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                         const at::Tensor& schedule_step, const at::Tensor& hyper, at::IntArrayRef groups,
                         bool advance_schedule, const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_clip,
                         Run&& run) {
  check_call_arguments(schedule_step, hyper);
  int64_t total = 0;
  std::vector<StridedLayout> layouts;
  const std::vector<TensorRow> rows = build_tensor_rows(
      {params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps}, schedule_step.device(), hyper.size(0),
      groups, total, layouts);
  check_no_shared_memory(rows, layouts, params.empty() ? 1 : params[0].element_size());
  check_scaler_tensors(grad_scale, found_inf, schedule_step.device(), grad_clip);
  const at::ScalarType dtype = params.empty() ? at::kFloat : params[0].scalar_type();
  run({rows, layouts, total, dtype, !max_exp_avg_sqs.empty(), schedule_step, hyper, advance_schedule, grad_scale, found_inf,
       grad_clip});
}

// The function a device registers for fused_adamw_: the checked entry above, in
// front of that device's run_rows.
template <RunRows run>
void fused_adamw_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList state_steps, const at::Tensor& schedule_step,
                    const at::Tensor& hyper, at::IntArrayRef groups, bool advance_schedule,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                    const std::optional<at::Tensor>& grad_clip) {
  checked_fused_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, schedule_step, hyper, groups,
                      advance_schedule, grad_scale, found_inf, grad_clip, run);
}

}  // namespace noam_ext

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

// The arguments of the low-byte options (storage.h): float32 masters or int16
// remainders, and stochastic rounding's per-parameter streams and element offsets.
struct LowByteArgs {
  at::TensorList masters;
  at::IntArrayRef rng_streams;
  at::IntArrayRef element_offsets;
  bool stochastic_rounding = false;
  at::TensorList moment_absmax = {};   // 8-bit moments' scales (op_checks.h, OpTensors)
};

// `run` is called with the checked call: a device's run_rows, or the host
// emulation of the CUDA kernels (tests/host_run/host_run.cpp).
template <typename Run>
void checked_fused_adamw(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                         const at::Tensor& schedule_step, const at::Tensor& hyper, at::IntArrayRef groups,
                         bool advance_schedule, const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_clip,
                         const LowByteArgs& low_byte, Run&& run) {
  check_call_arguments(schedule_step, hyper);
  int64_t total = 0;
  std::vector<StridedLayout> layouts;
  StorageTypes types{};
  const std::vector<TensorRow> rows = build_tensor_rows(
      {params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, low_byte.masters, low_byte.rng_streams,
       low_byte.element_offsets, low_byte.stochastic_rounding, low_byte.moment_absmax},
      schedule_step.device(), hyper.size(0), groups, total, layouts, types);
  check_no_shared_memory(rows, layouts, params.empty() ? 1 : params[0].element_size());
  check_scaler_tensors(grad_scale, found_inf, schedule_step.device(), grad_clip);
  run({rows, layouts, total, types.param, !max_exp_avg_sqs.empty(), schedule_step, hyper, advance_schedule,
       grad_scale, found_inf, grad_clip, types, low_byte.stochastic_rounding});
}

// The function a device registers for fused_adamw_: the checked entry above, in
// front of that device's run_rows.
template <RunRows run>
void fused_adamw_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList state_steps, const at::Tensor& schedule_step,
                    const at::Tensor& hyper, at::IntArrayRef groups, bool advance_schedule,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                    const std::optional<at::Tensor>& grad_clip, std::optional<at::TensorList> masters,
                    at::IntArrayRef rng_streams, at::IntArrayRef element_offsets, bool stochastic_rounding,
                    std::optional<at::TensorList> moment_absmax) {
  checked_fused_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, schedule_step, hyper, groups,
                      advance_schedule, grad_scale, found_inf, grad_clip,
                      {masters.value_or(at::TensorList{}), rng_streams, element_offsets, stochastic_rounding,
                       moment_absmax.value_or(at::TensorList{})},
                      run);
}

}  // namespace noam_ext

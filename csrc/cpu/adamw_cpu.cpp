// noam_ext::fused_adamw_ on the CPU: one multi-threaded pass over the flat
// buffers, every parameter of every group, with the Noam lr and the bias
// corrections computed here from the step counters.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <vector>

#include "../noam_ext/op_checks.h"
#include "../noam_ext/work_split.h"
#include "cpu_capability.h"

namespace noam_ext::cpu {
namespace {

// Elements per parallel task: large enough that a thread streams long
// contiguous runs, small enough that two threads share 1e5 elements.
constexpr int64_t kGrainSize = 32768;

// Coefficients of every active parameter, computed once per (group, step)
// run: in the common case all parameters of a group share their step count,
// so the pow() calls happen per group, not per parameter.
void compute_coefficients(
    const Segment* segments, int64_t n, const double* hyper, int64_t schedule_step,
    const float* steps, const bool* active, std::vector<SegmentCoefficients>& out) {
  out.resize(n);
  int64_t previous = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (active != nullptr && !active[i]) {
      continue;
    }
    const int64_t g = segments[i].group;
    if (previous >= 0 && segments[previous].group == g && steps[previous] == steps[i]) {
      out[i] = out[previous];
    } else {
      const double* row = hyper + g * kNumHyperColumns;
      out[i].f32 = coefficients_for<float>(row, schedule_step, steps[i]);
      out[i].f64 = coefficients_for<double>(row, schedule_step, steps[i]);
    }
    previous = i;
  }
}

void fused_adamw_cpu(
    const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
    const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& max_exp_avg_sq,
    const at::Tensor& param_steps, const at::Tensor& schedule_step, const at::Tensor& segments_table,
    const at::Tensor& hyper_table, const std::optional<at::Tensor>& active_mask, const std::optional<at::Tensor>& grad_scale,
    const std::optional<at::Tensor>& found_inf) {
  check_fused_adamw_args(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, param_steps, schedule_step,
                         segments_table, hyper_table, active_mask, grad_scale, found_inf);
  int64_t* schedule = schedule_step.data_ptr<int64_t>();
  // GradScaler found an inf/NaN gradient: the step is skipped as in PyTorch's
  // fused AdamW (no parameter, state or per-parameter step changes). The
  // schedule still advances, as a TransformerLRScheduler stepped after every
  // optimizer.step() does, so the host's view of the lr stays right without a sync.
  if (found_inf && found_inf->item<float>() != 0.0f) {
    *schedule += 1;
    return;
  }
  const double grad_divisor = grad_scale ? static_cast<double>(grad_scale->item<float>()) : 1.0;

  const int64_t n = segments_table.size(0);
  const int64_t total = param.numel();
  const int64_t n_groups = hyper_table.size(0);
  const auto* segments = reinterpret_cast<const Segment*>(segments_table.data_ptr<int64_t>());
  const double* hyper = hyper_table.data_ptr<double>();
  float* steps = param_steps.data_ptr<float>();
  const bool* active = active_mask ? active_mask->data_ptr<bool>() : nullptr;

  check_segments(segments, n, total, n_groups);

  thread_local std::vector<SegmentCoefficients> coefficients;
  compute_coefficients(segments, n, hyper, *schedule, steps, active, coefficients);

  // amsgrad and maximize are per group, as in torch.optim.AdamW.
  const SegmentKernel kernels[2] = {select_segment_kernel(param.scalar_type(), false),
                                    select_segment_kernel(param.scalar_type(), true)};
  TORCH_CHECK(kernels[0] != nullptr && kernels[1] != nullptr, "fused_adamw_: no CPU kernel for ",
              param.scalar_type());
  const FlatPointers buffers{
      param.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
      max_exp_avg_sq ? max_exp_avg_sq->data_ptr() : nullptr};
  const SegmentCoefficients* coeffs = coefficients.data();

  // Split the flat range, not the parameter list, so that one huge tensor and
  // many tiny ones spread over the threads alike.
  at::parallel_for(0, total, kGrainSize, [&](int64_t begin, int64_t end) {
    for_each_segment_in_range(segments, n, begin, end, [&](int64_t i, int64_t lo, int64_t hi) {
      if (active != nullptr && !active[i]) {
        return;
      }
      const double* row = hyper + segments[i].group * kNumHyperColumns;
      kernels[row[kAmsgrad] != 0.0](buffers, lo, hi, coeffs[i], row[kMaximize] != 0.0, grad_divisor);
    });
  });

  for (int64_t i = 0; i < n; ++i) {
    if (active == nullptr || active[i]) {
      steps[i] += 1.0f;
    }
  }
  *schedule += 1;
}

}  // namespace

TORCH_LIBRARY_IMPL(noam_ext, CPU, m) {
  m.impl("fused_adamw_", &fused_adamw_cpu);
}

}  // namespace noam_ext::cpu

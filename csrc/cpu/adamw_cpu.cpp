// noam_ext::fused_adamw_ on the CPU: one multi-threaded pass over every tensor
// of the call, with the scheduled lr and the bias corrections computed here from the
// step counters.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <vector>

#include "../noam_ext/op_entry.h"
#include "../noam_ext/work_split.h"
#include "cpu_capability.h"

namespace noam_ext::cpu {
namespace {

// Elements per parallel task: large enough that a thread streams long
// contiguous runs, small enough that two threads share 1e5 elements.
constexpr int64_t kGrainSize = 32768;

// Coefficients of every row, computed once per (group, step) run: in the
// common case all parameters of a group share their step count, so the pow()
// calls happen per group, not per parameter.
void compute_coefficients(const std::vector<TensorRow>& rows, const double* hyper, int64_t schedule_step,
                          std::vector<SegmentCoefficients>& out) {
  out.resize(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    const int32_t g = rows[i].group;
    const float step = *rows[i].step;
    if (i > 0 && rows[i - 1].group == g && *rows[i - 1].step == step) {
      out[i] = out[i - 1];
    } else {
      const double* row = hyper + g * kNumHyperColumns;
      out[i].f32 = coefficients_for<float>(row, schedule_step, step);
      out[i].f64 = coefficients_for<double>(row, schedule_step, step);
    }
  }
}

}  // namespace

bool op_is_parallel() {
#if defined(INTRA_OP_PARALLEL)
  return true;
#else
  return false;
#endif
}

void run_rows(const RowsCall& call) {
  TORCH_CHECK(call.hyper.is_cpu(), "fused_adamw_: the CPU op reads hyper on the CPU, got it on ",
              call.hyper.device());
  int64_t* schedule = call.schedule_step.data_ptr<int64_t>();
  // GradScaler found an inf/NaN gradient: the step is skipped as in PyTorch's
  // fused AdamW (no parameter, moment or step changes). The schedule still
  // advances, as a TransformerLRScheduler stepped after every optimizer.step()
  // does, so the host's view of the lr stays right without a sync.
  if (call.found_inf && call.found_inf->item<float>() != 0.0f) {
    *schedule += call.advance_schedule ? 1 : 0;
    return;
  }
  const double grad_divisor = call.grad_scale ? static_cast<double>(call.grad_scale->item<float>()) : 1.0;
  const double grad_multiplier = call.grad_clip ? call.grad_clip->item<double>() : 1.0;
  const double* hyper = call.hyper.const_data_ptr<double>();

  thread_local std::vector<SegmentCoefficients> coefficients;
  compute_coefficients(call.rows, hyper, *schedule, coefficients);

  const SegmentKernel kernel = select_segment_kernel(call.dtype, call.amsgrad);
  TORCH_CHECK(kernel != nullptr, "fused_adamw_: no CPU kernel for ", call.dtype);
  const SegmentCoefficients* coeffs = coefficients.data();
  const TensorRow* table = call.rows.data();
  const int64_t n = static_cast<int64_t>(call.rows.size());

  // Split the virtual range, not the tensor list, so that one huge tensor and
  // many tiny ones spread over the threads alike.
  at::parallel_for(0, call.total, kGrainSize, [&](int64_t begin, int64_t end) {
    for_each_row_in_range(table, n, begin, end, [&](int64_t i, int64_t lo, int64_t hi) {
      const TensorRow& r = table[i];
      const FlatPointers pointers{r.param, r.grad, r.exp_avg, r.exp_avg_sq, r.max_exp_avg_sq};
      kernel(pointers, lo, hi, coeffs[i], hyper[r.group * kNumHyperColumns + kMaximize] != 0.0, grad_divisor,
             grad_multiplier);
    });
  });

  for (const TensorRow& r : call.rows) {
    *r.step += 1.0f;
  }
  *schedule += call.advance_schedule ? 1 : 0;
}

TORCH_LIBRARY_IMPL(noam_ext, CPU, m) {
  m.impl("fused_adamw_", &fused_adamw_op<&run_rows>);
}

}  // namespace noam_ext::cpu

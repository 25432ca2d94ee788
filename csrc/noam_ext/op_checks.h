// Argument checks shared by every implementation of noam_ext::fused_adamw_, and
// the host-side table of tensor rows (work_split.h) that every implementation
// runs from. Everything is checked before any memory is touched, so a failed
// call changes nothing. Messages name the offending list element through
// `name_of`, so that FusedAdamW can name the parameter instead ("parameter 3 of
// param group 1") when it checks a call before making it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/FunctionRef.h>

#include <algorithm>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "adamw_math.h"
#include "work_split.h"

namespace noam_ext {

// Names the i-th tensor of a call in error messages (called only on an error).
using TensorNamer = c10::function_ref<std::string(int64_t)>;

inline std::string list_element_name(int64_t i) {
  return "params[" + std::to_string(i) + "]";
}

// The tensors of one call, as the op receives them.
struct OpTensors {
  at::TensorList params;
  at::TensorList grads;
  at::TensorList exp_avgs;
  at::TensorList exp_avg_sqs;
  at::TensorList max_exp_avg_sqs;   // empty (no amsgrad) or one per param
  at::TensorList state_steps;
};

inline bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf;
}

// The call-wide arguments: the schedule counter and the hyperparameter table.
inline void check_call_arguments(const at::Tensor& schedule_step, const at::Tensor& hyper) {
  TORCH_CHECK(schedule_step.scalar_type() == at::kLong && schedule_step.numel() == 2 &&
                  schedule_step.is_contiguous(),
              "fused_adamw_: schedule_step must be a contiguous two-element int64 tensor (completed steps, and "
              "a reserved zero)");
  // On the CPU, or (CUDA) on the call's device, where the kernel reads it as it is
  // when the launch runs: a CUDA graph replay sees changes made by stream-ordered copies.
  TORCH_CHECK(hyper.scalar_type() == at::kDouble && hyper.dim() == 2 && hyper.size(1) == kNumHyperColumns &&
                  hyper.is_contiguous() && (hyper.is_cpu() || hyper.device() == schedule_step.device()),
              "fused_adamw_: hyper must be a contiguous float64 [groups, ", int(kNumHyperColumns),
              "] tensor on the CPU or on the call's device (", schedule_step.device(), ")");
}

// Checks the tensors of the i-th parameter of a call and returns its row (offset
// left for the caller). vmax is null without amsgrad.
inline TensorRow check_and_make_row(const at::Tensor& p, const at::Tensor& grad, const at::Tensor& exp_avg,
                                    const at::Tensor& exp_avg_sq, const at::Tensor* vmax, const at::Tensor& step,
                                    const at::Device& device, at::ScalarType call_dtype, int64_t group,
                                    int64_t n_groups, int64_t i, const TensorNamer& name_of) {
  TORCH_CHECK(p.defined() && p.layout() == at::kStrided, "fused_adamw_: ", name_of(i),
              " must be a dense (strided) tensor");
  const at::ScalarType dtype = p.scalar_type();
  TORCH_CHECK(is_supported_dtype(dtype), "fused_adamw_: ", name_of(i),
              " must be float32, float64, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(p.device() == device, "fused_adamw_: ", name_of(i), " is on ", p.device(), " but this call runs on ",
              device, " (one call takes one device)");
  TORCH_CHECK(dtype == call_dtype, "fused_adamw_: ", name_of(i), " has dtype ", dtype, " but this call's "
              "parameters have ", call_dtype, " (one call takes one dtype)");
  const bool contiguous = p.is_contiguous();
  TORCH_CHECK(contiguous || p.is_non_overlapping_and_dense(), "fused_adamw_: ", name_of(i),
              " must be non-overlapping and dense in memory (e.g. contiguous)");
  const at::IntArrayRef sizes = p.sizes();
  const int64_t numel = p.numel();
  // The common case first, in few reads: same layout, dtype, device, shape and
  // (for a contiguous parameter) contiguous. Anything else gets the detailed checks.
  auto like_param = [&](const at::Tensor& x) {
    return x.defined() && x.layout() == at::kStrided && x.scalar_type() == dtype && x.device() == device &&
           x.sizes() == sizes && (numel <= 1 || (contiguous ? x.is_contiguous() : x.strides() == p.strides()));
  };
  auto check_like_param = [&](const at::Tensor& x, const char* what) {
    if (like_param(x)) {
      return;
    }
    TORCH_CHECK(x.defined() && x.layout() == at::kStrided, "fused_adamw_: the ", what, " of ", name_of(i),
                " must be a dense (strided) tensor", x.defined() && x.is_sparse() ? ", got a sparse one" : "");
    TORCH_CHECK(x.device() == device, "fused_adamw_: the ", what, " of ", name_of(i), " is on ", x.device(),
                " but the parameter is on ", p.device());
    TORCH_CHECK(x.scalar_type() == dtype, "fused_adamw_: the ", what, " of ", name_of(i), " has dtype ",
                x.scalar_type(), " but the parameter has ", dtype);
    TORCH_CHECK(x.sizes() == sizes, "fused_adamw_: the ", what, " of ", name_of(i), " has shape ", x.sizes(),
                " but the parameter has ", sizes);
    // Same strides (or at most one element): element k of each tensor is then
    // at the same distance from its start, so one linear walk serves all.
    TORCH_CHECK(false, "fused_adamw_: the ", what, " of ", name_of(i), " has strides ", x.strides(),
                " but the parameter has ", p.strides());
  };
  check_like_param(grad, "gradient");
  check_like_param(exp_avg, "exp_avg");
  check_like_param(exp_avg_sq, "exp_avg_sq");
  if (vmax != nullptr) {
    check_like_param(*vmax, "max_exp_avg_sq");
  }
  TORCH_CHECK(step.defined() && step.scalar_type() == at::kFloat && step.numel() == 1 && step.device() == device,
              "fused_adamw_: the step of ", name_of(i), " must be a one-element float32 tensor on ", device);
  TORCH_CHECK(group >= 0 && group < n_groups, "fused_adamw_: ", name_of(i), " names hyperparameter row ", group,
              " but there are ", n_groups);
  TensorRow r{};
  r.numel = numel;
  r.param = p.data_ptr();
  r.grad = grad.const_data_ptr();
  r.exp_avg = exp_avg.data_ptr();
  r.exp_avg_sq = exp_avg_sq.data_ptr();
  r.max_exp_avg_sq = vmax != nullptr ? vmax->data_ptr() : nullptr;
  r.step = step.data_ptr<float>();
  r.group = static_cast<int32_t>(group);
  return r;
}

// Each parameter of a call needs a step tensor of its own: the CUDA prepare pass
// advances every row's step at once (a shared one would race), the CPU op would
// advance it twice.
inline void check_distinct_steps(const std::vector<TensorRow>& rows, const TensorNamer& name_of = list_element_name) {
  auto address = [&](size_t i) { return reinterpret_cast<uintptr_t>(rows[i].step); };
  // Usually in ascending memory (FusedAdamW makes the steps of parameters that start
  // together in one tensor): then one pass shows they differ, without a sort.
  bool ascending = true;
  for (size_t i = 1; i < rows.size() && ascending; ++i) {
    ascending = address(i - 1) < address(i);
  }
  if (ascending) {
    return;
  }
  std::vector<std::pair<uintptr_t, int64_t>> steps;
  steps.reserve(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    steps.emplace_back(address(i), static_cast<int64_t>(i));
  }
  std::sort(steps.begin(), steps.end());
  for (size_t k = 1; k < steps.size(); ++k) {
    TORCH_CHECK(steps[k].first != steps[k - 1].first, "fused_adamw_: ", name_of(steps[k - 1].second), " and ",
                name_of(steps[k].second), " share one step tensor (state['step']); each parameter needs its own");
  }
}

// Checks the tensors of one call (all on `device`, hyper rows 0..n_groups-1) and
// returns their rows, in list order, with virtual offsets (work_split.h); `total`
// receives the virtual length.
inline std::vector<TensorRow> build_tensor_rows(const OpTensors& t, const at::Device& device, int64_t n_groups,
                                                at::IntArrayRef groups, int64_t& total,
                                                const TensorNamer& name_of = list_element_name) {
  const int64_t n = static_cast<int64_t>(t.params.size());
  TORCH_CHECK(static_cast<int64_t>(t.grads.size()) == n && static_cast<int64_t>(t.exp_avgs.size()) == n &&
                  static_cast<int64_t>(t.exp_avg_sqs.size()) == n &&
                  static_cast<int64_t>(t.state_steps.size()) == n && static_cast<int64_t>(groups.size()) == n,
              "fused_adamw_: params, grads, exp_avgs, exp_avg_sqs, state_steps and groups must have the same "
              "length (", n, ", ", t.grads.size(), ", ", t.exp_avgs.size(), ", ", t.exp_avg_sqs.size(), ", ",
              t.state_steps.size(), ", ", groups.size(), ")");
  const bool amsgrad = !t.max_exp_avg_sqs.empty();
  TORCH_CHECK(!amsgrad || static_cast<int64_t>(t.max_exp_avg_sqs.size()) == n,
              "fused_adamw_: max_exp_avg_sqs must be empty (no amsgrad) or have one tensor per param, got ",
              t.max_exp_avg_sqs.size(), " for ", n, " params");

  std::vector<TensorRow> rows(n);
  int64_t end = 0;
  const at::ScalarType call_dtype = n > 0 ? t.params[0].scalar_type() : at::kFloat;
  for (int64_t i = 0; i < n; ++i) {
    rows[i] = check_and_make_row(t.params[i], t.grads[i], t.exp_avgs[i], t.exp_avg_sqs[i],
                                 amsgrad ? &t.max_exp_avg_sqs[i] : nullptr, t.state_steps[i], device, call_dtype,
                                 groups[i], n_groups, i, name_of);
    rows[i].offset = next_row_offset(end);
    end = rows[i].offset + rows[i].numel;
  }
  total = end;
  check_distinct_steps(rows, name_of);
  return rows;
}

// Parameters written by one call must not share memory: their elements would be
// updated concurrently. (FusedAdamW splits tied parameters over several calls.)
inline void check_no_shared_memory(const std::vector<TensorRow>& rows, int64_t element_size,
                                   const TensorNamer& name_of = list_element_name) {
  std::vector<std::pair<uintptr_t, int64_t>> spans;  // (start, row) of params with elements
  spans.reserve(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    if (rows[i].numel > 0) {
      spans.emplace_back(reinterpret_cast<uintptr_t>(rows[i].param), static_cast<int64_t>(i));
    }
  }
  std::sort(spans.begin(), spans.end());
  uintptr_t reach = 0;      // end of the furthest-reaching span so far
  int64_t reacher = -1;
  for (const auto& [start, i] : spans) {
    TORCH_CHECK(reacher < 0 || start >= reach, "fused_adamw_: ", name_of(reacher), " and ", name_of(i),
                " share memory; pass tensors that share memory in separate calls");
    const uintptr_t span_end = start + static_cast<uintptr_t>(rows[i].numel * element_size);
    if (span_end > reach) {
      reach = span_end;
      reacher = i;
    }
  }
}

inline void check_scaler_tensors(const std::optional<at::Tensor>& grad_scale,
                                 const std::optional<at::Tensor>& found_inf, const at::Device& device,
                                 const std::optional<at::Tensor>& grad_clip = std::nullopt) {
  if (grad_clip) {
    TORCH_CHECK(grad_clip->numel() == 1 && grad_clip->scalar_type() == at::kDouble && grad_clip->device() == device,
                "fused_adamw_: grad_clip must be a one-element float64 tensor on ", device);
  }
  for (const auto* t : {&grad_scale, &found_inf}) {
    if (t->has_value()) {
      TORCH_CHECK((*t)->numel() == 1 && (*t)->scalar_type() == at::kFloat && (*t)->device() == device,
                  "fused_adamw_: grad_scale and found_inf must be one-element float32 tensors on ", device);
    }
  }
}

}  // namespace noam_ext

// Running one call's tensors once they are checked and laid out as rows
// (op_checks.h): the part of each device's op after its argument checks. The
// registered ops call these after build_tensor_rows; FusedAdamW's step
// (python_module.cpp), which checks every call of a step before making any,
// calls them directly with the rows it has already built, instead of going
// through the dispatcher and checking everything a second time.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "../cuda/launch_pointers.h"
#include "storage.h"
#include "work_split.h"

namespace noam_ext {

struct RowsCall {
  const std::vector<TensorRow>& rows;
  const std::vector<StridedLayout>& layouts;   // of the rows whose layout is not -1
  int64_t total;                 // virtual length (build_tensor_rows)
  at::ScalarType dtype;
  bool amsgrad;
  const at::Tensor& schedule_step;
  const at::Tensor& hyper;       // float64 [groups, kNumHyperColumns]: CPU, or (CUDA) the call's device
  bool advance_schedule;
  const std::optional<at::Tensor>& grad_scale;
  const std::optional<at::Tensor>& found_inf;
  const std::optional<at::Tensor>& grad_clip;   // float64 [1]: multiplies every gradient
  StorageTypes storage;          // what the tensors are stored in (storage.h); dtype is storage.param
  bool stochastic_rounding;      // round bfloat16 stores stochastically (adamw_math.h)
};

namespace cpu {
void run_rows(const RowsCall& call);
// Whether the CPU op was compiled to split its work over torch's intra-op threads
// (at::parallel_for runs serially in a translation unit built without OpenMP).
bool op_is_parallel();
}  // namespace cpu

#if defined(NOAM_EXT_WITH_CUDA)
namespace cuda {
void run_rows(const RowsCall& call);

// For tests, through noam_ext._C (no GPU needed): [device tables cached, tables that
// live CUDA graphs hold], over every device and stream.
std::vector<int64_t> table_cache_stats();

// For tests, through noam_ext._C (no GPU needed): see launch_pointers.h.
std::vector<LaunchPointers> launch_pointers();
}  // namespace cuda
#endif

}  // namespace noam_ext

// Runs the CUDA kernel's block driver (csrc/cuda/fused_adamw_plan.h) on the
// host: every block of an emulated grid in turn, every thread of a block in
// turn between the block's synchronisation points. Built into every variant
// of the extension, so CI checks the kernel's work split (chunks, rows,
// vectors, unrolling, tails, misaligned tensors, 64-bit offsets) against the
// CPU op without a GPU.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "../cuda/kernel_args.h"
#include "../noam_ext/op_checks.h"

namespace noam_ext::cpu {
namespace {

using namespace noam_ext::cuda_plan;

struct HostExec {
  int64_t block_index;
  int64_t grid;
  int threads;
  int64_t block() const { return block_index; }
  int64_t num_blocks() const { return grid; }
  // The leader's work (computing what the block shares) runs once per block.
  bool leader() const { return true; }
  void sync() const {}
  template <typename F>
  void for_my_threads(F&& f) const {
    for (int t = 0; t < threads; ++t) {
      f(t, threads);
    }
  }
};

void emulate_cuda_fused_adamw(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                              at::TensorList state_steps, const at::Tensor& schedule_step, const at::Tensor& hyper,
                              at::IntArrayRef groups, int64_t num_blocks, int64_t threads_per_block,
                              bool advance_schedule, const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf,
                              const std::optional<at::Tensor>& grad_clip) {
  check_call_arguments(schedule_step, hyper);
  int64_t total = 0;
  const std::vector<TensorRow> rows = build_tensor_rows({params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps},
                                                     schedule_step.device(), hyper.size(0), groups, total);
  check_no_shared_memory(rows, params.empty() ? 1 : params[0].element_size());
  check_scaler_tensors(grad_scale, found_inf, schedule_step.device(), grad_clip);
  TORCH_CHECK(num_blocks >= 1 && threads_per_block >= 1, "emulate_cuda_fused_adamw_: empty grid");
  const at::ScalarType dtype = params.empty() ? at::kFloat : params[0].scalar_type();
  dispatch_storage_type(dtype, [&](auto type_tag) {
    using scalar_t = decltype(type_tag);
    const KernelArgs args = make_kernel_args(rows.data(), static_cast<int64_t>(rows.size()), total,
                                             !max_exp_avg_sqs.empty(), schedule_step, hyper, advance_schedule,
                                             grad_scale, found_inf, grad_clip);
    for (int64_t b = 0; b < num_blocks; ++b) {  // the fused_adamw_kernel launch
      HostExec exec{b, num_blocks, static_cast<int>(threads_per_block)};
      SegmentShared<typename MathType<scalar_t>::type> shared;
      run_block<scalar_t>(args, exec, shared);
    }
    for (int t = 0; t < threads_per_block; ++t) {  // what the last block to finish does
      advance_steps(args, schedule_step.data_ptr<int64_t>(), t, static_cast<int>(threads_per_block));
    }
  });
}

std::vector<int64_t> emulate_row_walk(at::IntArrayRef numels, int64_t begin, int64_t end) {
  std::vector<TensorRow> rows(numels.size());
  int64_t next = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    rows[i].offset = next_row_offset(next);
    rows[i].numel = numels[i];
    next = rows[i].offset + rows[i].numel;
  }
  std::vector<int64_t> out;
  for_each_row_in_range(rows.data(), static_cast<int64_t>(rows.size()), begin, end, [&](int64_t i, int64_t lo, int64_t hi) {
    out.insert(out.end(), {i, lo, hi});
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(noam_ext, CompositeExplicitAutograd, m) {
  m.impl("emulate_row_walk", &emulate_row_walk);
}

TORCH_LIBRARY_IMPL(noam_ext, CPU, m) {
  m.impl("emulate_cuda_fused_adamw_", &emulate_cuda_fused_adamw);
}

}  // namespace noam_ext::cpu

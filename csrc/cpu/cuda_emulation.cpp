// Runs the CUDA kernel's block driver (csrc/cuda/fused_adamw_plan.h) on the
// host: every block of an emulated grid in turn, every thread of a block in
// turn between the block's synchronisation points. Built into every variant
// of the extension, so CI checks the kernel's work split (chunks, segments,
// vectors, unrolling, tails, 64-bit offsets) against the CPU op without a GPU.
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

void emulate_cuda_fused_adamw(
    const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
    const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& max_exp_avg_sq,
    const at::Tensor& param_steps, const at::Tensor& schedule_step, const at::Tensor& segments,
    const at::Tensor& hyper, const std::optional<at::Tensor>& active, int64_t num_blocks,
    int64_t threads_per_block, const std::optional<at::Tensor>& grad_scale,
    const std::optional<at::Tensor>& found_inf) {
  check_fused_adamw_args(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, param_steps, schedule_step,
                         segments, hyper, active, grad_scale, found_inf);
  TORCH_CHECK(num_blocks >= 1 && threads_per_block >= 1, "emulate_cuda_fused_adamw_: empty grid");
  check_segments(reinterpret_cast<const Segment*>(segments.data_ptr<int64_t>()), segments.size(0), param.numel(),
                 hyper.size(0));
  dispatch_storage_type(param.scalar_type(), [&](auto type_tag) {
    using scalar_t = decltype(type_tag);
    const auto args = make_kernel_args<scalar_t>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, param_steps,
                                                 schedule_step, segments, hyper, active, grad_scale, found_inf);
    for (int64_t b = 0; b < num_blocks; ++b) {  // the fused_adamw_kernel launch
      HostExec exec{b, num_blocks, static_cast<int>(threads_per_block)};
      SegmentShared<typename MathType<scalar_t>::type> shared;
      run_block(args, exec, shared);
    }
    for (int t = 0; t < threads_per_block; ++t) {  // what the last block to finish does
      advance_steps(param_steps.data_ptr<float>(), schedule_step.data_ptr<int64_t>(), args.active,
                    args.found_inf, args.num_segments, t, static_cast<int>(threads_per_block));
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(noam_ext, CPU, m) {
  m.impl("emulate_cuda_fused_adamw_", &emulate_cuda_fused_adamw);
}

}  // namespace noam_ext::cpu

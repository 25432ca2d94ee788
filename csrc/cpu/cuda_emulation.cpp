// Runs the CUDA kernel's block driver (csrc/cuda/fused_adamw_plan.h) on the
// host: every block of an emulated grid in turn, every thread of a block in
// turn between the block's synchronisation points. Built into every variant
// of the extension, so CI checks the kernel's work split (chunks, segments,
// vectors, unrolling, tails, 64-bit offsets) against the CPU op without a GPU.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>

#include "../cuda/fused_adamw_plan.h"
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

template <typename scalar_t>
void emulate(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
             const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& max_exp_avg_sq,
             const at::Tensor& param_steps, const at::Tensor& schedule_step, const at::Tensor& segments,
             const at::Tensor& hyper, const std::optional<at::Tensor>& active, int64_t num_blocks,
             int64_t threads_per_block, const std::optional<at::Tensor>& grad_scale,
             const std::optional<at::Tensor>& found_inf) {
  KernelArgs<scalar_t> a{};
  a.param = param.data_ptr<scalar_t>();
  a.grad = grad.data_ptr<scalar_t>();
  a.exp_avg = exp_avg.data_ptr<scalar_t>();
  a.exp_avg_sq = exp_avg_sq.data_ptr<scalar_t>();
  a.max_exp_avg_sq = max_exp_avg_sq ? max_exp_avg_sq->data_ptr<scalar_t>() : nullptr;
  a.param_steps = param_steps.data_ptr<float>();
  a.schedule_step = schedule_step.data_ptr<int64_t>();
  a.segments = reinterpret_cast<const Segment*>(segments.data_ptr<int64_t>());
  a.active = active ? active->data_ptr<bool>() : nullptr;
  a.grad_scale = grad_scale ? grad_scale->data_ptr<float>() : nullptr;
  a.found_inf = found_inf ? found_inf->data_ptr<float>() : nullptr;
  a.num_segments = segments.size(0);
  a.total = param.numel();
  const double* rows = hyper.data_ptr<double>();
  std::copy(rows, rows + hyper.numel(), &a.hyper.rows[0][0]);
  for (int64_t b = 0; b < num_blocks; ++b) {
    HostExec exec{b, num_blocks, static_cast<int>(threads_per_block)};
    SegmentShared<typename MathType<scalar_t>::type> shared;
    run_block(a, exec, shared);
  }
  for (int t = 0; t < 256; ++t) {  // the advance_steps_kernel<<<1, 256>>> launch
    advance_steps(param_steps.data_ptr<float>(), schedule_step.data_ptr<int64_t>(), a.active, a.found_inf,
                  a.num_segments, t, 256);
  }
}

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
  TORCH_CHECK(hyper.size(0) <= kMaxGroups, "emulate_cuda_fused_adamw_: at most ", kMaxGroups, " groups");
  switch (param.scalar_type()) {
    case at::kFloat:
      return emulate<float>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, param_steps, schedule_step,
                            segments, hyper, active, num_blocks, threads_per_block, grad_scale, found_inf);
    case at::kDouble:
      return emulate<double>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, param_steps, schedule_step,
                             segments, hyper, active, num_blocks, threads_per_block, grad_scale, found_inf);
    case at::kBFloat16:
      return emulate<c10::BFloat16>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, param_steps,
                                    schedule_step, segments, hyper, active, num_blocks, threads_per_block,
                                    grad_scale, found_inf);
    case at::kHalf:
      return emulate<c10::Half>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, param_steps, schedule_step,
                                segments, hyper, active, num_blocks, threads_per_block, grad_scale, found_inf);
    default:
      TORCH_CHECK(false, "emulate_cuda_fused_adamw_: unsupported dtype ", param.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(noam_ext, CPU, m) {
  m.impl("emulate_cuda_fused_adamw_", &emulate_cuda_fused_adamw);
}

}  // namespace noam_ext::cpu

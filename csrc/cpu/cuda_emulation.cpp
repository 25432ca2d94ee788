// Runs the CUDA kernels' drivers (csrc/cuda/fused_adamw_plan.h) on the host: the
// prepare launch row by row, then every block of an emulated update grid in turn,
// every thread of a block in turn (the kernel has no barriers). Built into every
// variant of the extension, so CI checks the kernels' work split (chunks, rows,
// warp parts, vectors, unrolling, tails, misaligned tensors, 64-bit offsets)
// against the CPU op without a GPU.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "../cuda/kernel_args.h"
#include "../noam_ext/op_entry.h"

namespace noam_ext::cpu {
namespace {

using namespace noam_ext::cuda_plan;

struct HostExec {
  int64_t block_index;
  int64_t grid;
  int threads;
  int64_t block() const { return block_index; }
  int64_t num_blocks() const { return grid; }
  int num_threads() const { return threads; }
  // The block's threads one after another: they share nothing and never wait for
  // each other, so any order is an order the GPU could run them in.
  template <typename F>
  void for_my_threads(F&& f) const {
    for (int t = 0; t < threads; ++t) {
      f(t);
    }
  }
};

// One checked call (op_entry.h) over an emulated grid: the prepare launch, then the
// update launch's blocks one after another.
void emulate_rows(const RowsCall& call, int64_t num_blocks, int threads_per_block) {
  TORCH_CHECK(call.hyper.is_cpu(), "emulate_cuda_fused_adamw_: hyper must be a CPU tensor");
  TORCH_CHECK(call.layouts.empty(), "emulate_cuda_fused_adamw_: tensors that are not dense and laid out alike "
              "(strided rows) are not supported by the CUDA kernels yet");
  TORCH_CHECK(call.storage.is_plain() && !call.stochastic_rounding,
              "emulate_cuda_fused_adamw_: the low-byte options are not supported by the CUDA kernels yet");
  std::vector<RowCoefficients<double>> coefficients(call.rows.size());   // room for either math type
  dispatch_storage_type(call.dtype, [&](auto type_tag) {
    using scalar_t = decltype(type_tag);
    using opmath_t = typename MathType<scalar_t>::type;
    const KernelArgs args = make_kernel_args(call.rows.data(), static_cast<int64_t>(call.rows.size()), call.total,
                                             call.hyper.const_data_ptr<double>(), coefficients.data(),
                                             call.schedule_step, call.advance_schedule, call.grad_scale,
                                             call.found_inf, call.grad_clip);
    for (int64_t i = 0; i < args.num_rows; ++i) {  // the prepare launch
      prepare_row<opmath_t>(args, i);
    }
    advance_schedule_counter(args);  // what thread 0 of block 0 of the update launch does
    for (int64_t b = 0; b < num_blocks; ++b) {  // the update launch
      const HostExec exec{b, num_blocks, threads_per_block};
      if (call.amsgrad) {
        run_block<scalar_t, true>(args, exec);
      } else {
        run_block<scalar_t, false>(args, exec);
      }
    }
  });
}

void emulate_cuda_fused_adamw(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                              at::TensorList state_steps, const at::Tensor& schedule_step, const at::Tensor& hyper,
                              at::IntArrayRef groups, int64_t num_blocks, int64_t threads_per_block,
                              bool advance_schedule, const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf,
                              const std::optional<at::Tensor>& grad_clip, std::optional<at::TensorList> masters,
                              at::IntArrayRef rng_streams, at::IntArrayRef element_offsets,
                              bool stochastic_rounding) {
  TORCH_CHECK(num_blocks >= 1 && threads_per_block >= 1, "emulate_cuda_fused_adamw_: empty grid");
  checked_fused_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, schedule_step, hyper,
                      groups, advance_schedule, grad_scale, found_inf, grad_clip,
                      {masters.value_or(at::TensorList{}), rng_streams, element_offsets, stochastic_rounding},
                      [&](const RowsCall& call) {
                        emulate_rows(call, num_blocks, static_cast<int>(threads_per_block));
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

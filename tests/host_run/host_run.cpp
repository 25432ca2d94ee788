// The CUDA kernels' own code run on the host: csrc/cuda/kernels.cuh (prepare_kernel,
// update_kernel, DeviceExec, the device branches of the vector loads and stores, and
// the grid that run_rows launches), compiled here as plain C++ against
// cuda_host_shims.h. emulate_cuda_fused_adamw_ makes the launches run_rows makes, for
// a GPU with the given number of SMs, and calls each kernel once for every
// (block, thread) of its grid, as the GPU would, one after another (the kernels have
// no barriers and share nothing between threads, so any order is one the GPU could
// run them in). A test extension of its own (noam_ext_host_run, built by the tests:
// tests/host_run/__init__.py), not part of noam_ext._C: the product then holds one
// compilation of the kernels' header, nvcc's, and torch.ops.noam_ext lists only what
// users call (docs/architecture.md, "The host run of the kernels").
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "cuda_host_shims.h"   // after the torch headers, before the kernels

#include "cuda/kernel_args.h"
#include "cuda/kernels.cuh"
#include "noam_ext/op_entry.h"

namespace noam_ext::host_run {
namespace {

using namespace noam_ext::cuda_plan;

// The launches of one call on a GPU with `multiprocessors` SMs, for any storage: the host
// run compiles every storage's kernels in this one file (the CUDA build compiles them a
// few storages per unit: csrc/cuda/storage_units.cuh).
StepLaunches step_launches(const StorageTypes& storage, bool amsgrad, int64_t num_rows, int64_t total,
                           int64_t multiprocessors, bool strided_rows) {
  StepLaunches out;
  dispatch_storage(storage, [&](auto index) {
    constexpr int kStorage = decltype(index)::value;
    out = amsgrad ? step_launches_for<kStorage, true>(num_rows, total, multiprocessors, strided_rows)
                  : step_launches_for<kStorage, false>(num_rows, total, multiprocessors, strided_rows);
  });
  return out;
}

// Deliberately wrong launches, for the tests' mutation check: each breaks a rule
// the kernels rely on, and the tests must see a difference from the CPU op.
enum class WrongLaunch { kNone, kBlockTwice, kLastThreadSkipped, kUpdateBeforePrepare };

WrongLaunch wrong_launch_from(const std::string& name) {
  if (name.empty()) return WrongLaunch::kNone;
  if (name == "block_twice") return WrongLaunch::kBlockTwice;
  if (name == "last_thread_skipped") return WrongLaunch::kLastThreadSkipped;
  if (name == "update_before_prepare") return WrongLaunch::kUpdateBeforePrepare;
  TORCH_CHECK(false, "host_run fused_adamw_: unknown wrong_launch '", name,
              "' (block_twice, last_thread_skipped, update_before_prepare)");
}

// Runs one launch: the kernel once per (block, thread), with the CUDA builtins set as
// the GPU would set them. `only_blocks` (when not empty) restricts the blocks run.
void run_launch(const KernelLaunch& launch, const KernelArgs& args, const std::vector<int64_t>& only_blocks,
                WrongLaunch wrong) {
  gridDim = {launch.blocks, 1, 1};
  blockDim = {launch.threads, 1, 1};
  auto run_block_of_threads = [&](unsigned b) {
    blockIdx = {b, 0, 0};
    for (unsigned t = 0; t < launch.threads; ++t) {
      if (wrong == WrongLaunch::kLastThreadSkipped && b + 1 == launch.blocks && t + 1 == launch.threads) {
        continue;
      }
      threadIdx = {t, 0, 0};
      launch.kernel(args);
    }
  };
  if (!only_blocks.empty()) {
    for (const int64_t b : only_blocks) {
      TORCH_CHECK(b >= 0 && b < launch.blocks, "host_run fused_adamw_: block ", b, " is not in the grid of ",
                  launch.blocks);
      run_block_of_threads(static_cast<unsigned>(b));
    }
    return;
  }
  for (unsigned b = 0; b < launch.blocks; ++b) {
    run_block_of_threads(b);
  }
  if (wrong == WrongLaunch::kBlockTwice) {
    run_block_of_threads(0);
  }
}

struct HostRunOptions {
  int64_t multiprocessors;
  std::optional<int64_t> num_blocks;   // overrides the update grid
  int64_t threads_per_block;           // kThreadsPerBlock as on the GPU, or narrower
  std::vector<int64_t> only_blocks;    // of the update launch
  WrongLaunch wrong;
};

// What a host run reports: its grid and the 16-byte vectors it moved.
constexpr int kNumStats = 5;   // prepare blocks, update blocks, threads per block, vector loads, vector stores

void run_rows_on_host(const RowsCall& call, const HostRunOptions& options, int64_t* stats) {
  TORCH_CHECK(call.hyper.is_cpu(), "host_run fused_adamw_: hyper must be a CPU tensor");
  const auto num_rows = static_cast<int64_t>(call.rows.size());
  StepLaunches launches = step_launches(call.storage, call.amsgrad, num_rows, call.total, options.multiprocessors,
                                        !call.layouts.empty());
  if (options.threads_per_block != kThreadsPerBlock) {
    const auto threads = static_cast<unsigned>(options.threads_per_block);
    launches.prepare.blocks = static_cast<unsigned>((num_rows + threads - 1) / threads);
    launches.prepare.threads = threads;
    launches.update.threads = threads;
    launches.strided.threads = threads;
  }
  if (options.num_blocks) {
    launches.update.blocks = static_cast<unsigned>(*options.num_blocks);
    launches.strided.blocks = launches.strided.blocks > 0 ? launches.update.blocks : 0;
  }
  // Room for either math type's coefficients, filled with NaN bytes: an update that
  // read coefficients the prepare launch has not written would show it.
  std::vector<RowCoefficients<double>> coefficients(call.rows.size());
  std::memset(static_cast<void*>(coefficients.data()), 0xff, coefficients.size() * sizeof(coefficients[0]));
  const KernelArgs args = make_kernel_args(call, launches.chunk_elements, call.rows.data(), call.layouts.data(),
                                           call.hyper.const_data_ptr<double>(), coefficients.data());
  vector_counts = {};
  const std::vector<int64_t> all_blocks;
  if (options.wrong == WrongLaunch::kUpdateBeforePrepare) {
    run_launch(launches.update, args, options.only_blocks, options.wrong);
    run_launch(launches.prepare, args, all_blocks, options.wrong);
  } else {
    run_launch(launches.prepare, args, all_blocks, options.wrong);
    run_launch(launches.update, args, options.only_blocks, options.wrong);
  }
  if (launches.strided.blocks > 0) {
    run_launch(launches.strided, args, all_blocks, WrongLaunch::kNone);
  }
  if (stats != nullptr) {
    const int64_t values[kNumStats] = {launches.prepare.blocks, launches.update.blocks, launches.update.threads,
                                       vector_counts.loads, vector_counts.stores};
    std::memcpy(stats, values, sizeof(values));
  }
}

void emulate_cuda_fused_adamw(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                              at::TensorList state_steps, const at::Tensor& schedule_step, const at::Tensor& hyper,
                              at::IntArrayRef groups, int64_t multiprocessors, std::optional<int64_t> num_blocks,
                              int64_t threads_per_block, at::IntArrayRef only_blocks, c10::string_view wrong_launch,
                              const std::optional<at::Tensor>& stats, bool advance_schedule,
                              const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf,
                              const std::optional<at::Tensor>& grad_clip, std::optional<at::TensorList> masters,
                              at::IntArrayRef rng_streams, at::IntArrayRef element_offsets,
                              bool stochastic_rounding, std::optional<at::TensorList> moment_absmax) {
  TORCH_CHECK(multiprocessors >= 1, "host_run fused_adamw_: multiprocessors must be at least 1");
  TORCH_CHECK(!num_blocks || *num_blocks >= 1, "host_run fused_adamw_: num_blocks must be at least 1");
  TORCH_CHECK(threads_per_block >= 1 && threads_per_block <= kThreadsPerBlock,
              "host_run fused_adamw_: threads_per_block must be in [1, ", kThreadsPerBlock, "]");
  TORCH_CHECK(!stats || (stats->scalar_type() == at::kLong && stats->numel() == kNumStats &&
                         stats->is_contiguous() && stats->is_cpu()),
              "host_run fused_adamw_: stats must be a contiguous int64 CPU tensor of ", kNumStats, " elements");
  const HostRunOptions options{multiprocessors, num_blocks, threads_per_block, only_blocks.vec(),
                               wrong_launch_from(std::string(wrong_launch))};
  checked_fused_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, schedule_step, hyper,
                      groups, advance_schedule, grad_scale, found_inf, grad_clip,
                      {masters.value_or(at::TensorList{}), rng_streams, element_offsets, stochastic_rounding,
                       moment_absmax.value_or(at::TensorList{})},
                      [&](const RowsCall& call) {
                        run_rows_on_host(call, options, stats ? stats->data_ptr<int64_t>() : nullptr);
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

}  // namespace noam_ext::host_run

TORCH_LIBRARY(noam_ext_host_run, m) {
  // The CUDA kernels themselves (csrc/cuda/kernels.cuh) run on the host, every
  // (block, thread) of the launches the CUDA op makes on a GPU with `multiprocessors`
  // SMs: noam_ext::fused_adamw_'s arguments, CPU tensors. num_blocks and
  // threads_per_block override the update grid; only_blocks runs only those update
  // blocks; wrong_launch names a deliberately wrong launch; stats (int64 [5]) receives
  // the prepare and update blocks, the threads per block, and the 16-byte vector loads
  // and stores.
  m.def(
      "fused_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, "
      "Tensor(f!) schedule_step, Tensor hyper, int[] groups, *, int multiprocessors=132, int? num_blocks=None, "
      "int threads_per_block=256, int[] only_blocks=[], str wrong_launch=\"\", Tensor(h!)? stats=None, "
      "bool advance_schedule=True, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "Tensor? grad_clip=None, Tensor(g!)[]? masters=None, int[] rng_streams=[], int[] element_offsets=[], "
      "bool stochastic_rounding=False, Tensor(i!)[]? moment_absmax=None) -> ()");
  // The row walk alone (work_split.h) for tensors of the given sizes over the
  // virtual range [begin, end): (row, lo, hi) triples, flattened. Lets tests check
  // 64-bit offsets past 2**31 elements without allocating such tensors.
  m.def("row_walk(int[] numels, int begin, int end) -> int[]");
}

TORCH_LIBRARY_IMPL(noam_ext_host_run, CompositeExplicitAutograd, m) {
  m.impl("row_walk", &noam_ext::host_run::emulate_row_walk);
}

TORCH_LIBRARY_IMPL(noam_ext_host_run, CPU, m) {
  m.impl("fused_adamw_", &noam_ext::host_run::emulate_cuda_fused_adamw);
}

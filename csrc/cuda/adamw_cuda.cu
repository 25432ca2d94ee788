// noam_ext::fused_adamw_ on CUDA: the whole AdamW + Noam step for one call's
// tensors in two launches (a per-row prepare pass and the update), on the current
// stream, without any host synchronisation. The work split and the per-element math live in
// fused_adamw_plan.h / adamw_math.h, shared with the host emulation and the CPU op.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <list>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "../noam_ext/op_entry.h"
#include "kernel_args.h"

namespace noam_ext::cuda {
namespace {

using namespace noam_ext::cuda_plan;

struct DeviceExec {
  __device__ int64_t block() const { return blockIdx.x; }
  __device__ int64_t num_blocks() const { return gridDim.x; }
  __device__ int num_threads() const { return blockDim.x; }
  template <typename F>
  __device__ void for_my_threads(F&& f) const { f(static_cast<int>(threadIdx.x)); }
};

// Launch 1: every row's coefficients for this step, one thread per row.
template <typename opmath_t>
__global__ void __launch_bounds__(kThreadsPerBlock) prepare_kernel(const KernelArgs args) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < args.num_rows) {
    prepare_row<opmath_t>(args, i);
  }
}

// Launch 2: the update, compiled for min_blocks_per_sm resident blocks per SM.
template <typename scalar_t, bool amsgrad>
__global__ void __launch_bounds__(kThreadsPerBlock, min_blocks_per_sm<scalar_t, amsgrad>())
    update_kernel(const KernelArgs args) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    advance_schedule_counter(args);
  }
  run_block<scalar_t, amsgrad>(args, DeviceExec{});
}

int multiprocessor_count(int device) {
  static std::atomic<int> counts[64] = {};
  if (device < 64 && counts[device].load(std::memory_order_relaxed) > 0) {
    return counts[device].load(std::memory_order_relaxed);
  }
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (device < 64) {
    counts[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

// Device copies of recent call tables, per (device, stream): the rows, the
// hyperparameter table when the call passed it on the host, and room for the
// prepare pass's per-row coefficients. Uploading is a stream-ordered copy from
// pinned memory (no host sync); in steady-state training the tensors, and so the
// table, are the same every step, and it is uploaded once. A table used while a
// CUDA graph is captured is kept for the life of the process: the graph replays its
// kernels (and, if it was uploaded during capture, its copy) with those addresses.
// FusedAdamW passes its hyperparameters on the device (noam_ext/_hyper.py keeps
// them current with stream-ordered copies), so a change of lr is not a new table.
struct DeviceTable {
  std::vector<char> key;      // the uploaded bytes: rows, then host hyperparameters
  size_t hyper_offset = 0;    // where the hyperparameters start (if uploaded)
  size_t coefficients_offset = 0;
  at::Tensor staging;         // pinned host copy the upload reads (kept: captured copies replay it)
  at::Tensor source;          // or, for a table made during a capture, the same bytes already on
                              // the device (another stream's table): no pinned allocation then
  at::Tensor device;
  bool captured = false;
  // Whether an upload has run outside a capture. A copy issued while a graph is
  // captured only runs when that graph replays: until an eager upload, every use
  // issues the copy again (in a new capture, into that graph; eagerly, now).
  bool filled = false;
};

struct DeviceTablePointers {
  const TensorRow* rows;
  const double* hyper;        // null when the call's hyperparameters are on the device already
  void* coefficients;
};

constexpr size_t kCachedTablesPerStream = 8;

size_t round_up_16(size_t n) { return (n + 15) / 16 * 16; }

DeviceTablePointers device_table(const std::vector<TensorRow>& rows, const at::Tensor* host_hyper,
                                 const at::Device& device, cudaStream_t stream) {
  static std::mutex mutex;
  static std::map<std::pair<int, cudaStream_t>, std::list<DeviceTable>> caches;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  const bool capturing = capture != cudaStreamCaptureStatusNone;

  const size_t row_bytes = rows.size() * sizeof(TensorRow);
  const size_t hyper_offset = round_up_16(row_bytes);
  const size_t hyper_bytes = host_hyper ? static_cast<size_t>(host_hyper->numel()) * sizeof(double) : 0;
  const void* hyper_values = host_hyper ? host_hyper->const_data_ptr() : nullptr;
  // Compared in place: the steady state (the same table every step) allocates nothing.
  auto holds_this_call = [&](const DeviceTable& t) {
    return t.key.size() == hyper_offset + hyper_bytes && std::memcmp(t.key.data(), rows.data(), row_bytes) == 0 &&
           (hyper_bytes == 0 || std::memcmp(t.key.data() + hyper_offset, hyper_values, hyper_bytes) == 0);
  };
  auto pointers = [&](DeviceTable& t) {
    char* base = static_cast<char*>(t.device.data_ptr());
    return DeviceTablePointers{reinterpret_cast<const TensorRow*>(base),
                               host_hyper ? reinterpret_cast<const double*>(base + t.hyper_offset) : nullptr,
                               base + t.coefficients_offset};
  };

  // On the current stream, as the launches.
  auto upload = [capturing](DeviceTable& t) {
    const auto bytes = static_cast<int64_t>(t.key.size());
    t.device.narrow(0, 0, bytes).copy_(t.source.defined() ? t.source.narrow(0, 0, bytes) : t.staging,
                                       /*non_blocking=*/true);
    t.filled |= !capturing;
  };

  std::lock_guard<std::mutex> lock(mutex);
  auto& cache = caches[{device.index(), stream}];
  for (auto it = cache.begin(); it != cache.end(); ++it) {
    if (holds_this_call(*it)) {
      it->captured |= capturing;
      if (!it->filled) {
        upload(*it);
      }
      cache.splice(cache.begin(), cache, it);  // most recently used first
      return pointers(cache.front());
    }
  }
  DeviceTable table;
  table.key.assign(hyper_offset + hyper_bytes, 0);
  std::memcpy(table.key.data(), rows.data(), row_bytes);
  if (host_hyper) {
    std::memcpy(table.key.data() + hyper_offset, hyper_values, hyper_bytes);
  }
  table.hyper_offset = hyper_offset;
  table.coefficients_offset = round_up_16(table.key.size());
  table.captured = capturing;
  const auto length = static_cast<int64_t>(table.coefficients_offset + coefficient_bytes(rows.size()));
  if (capturing) {
    // The usual capture follows warm-up steps on another stream, whose table holds
    // these bytes: copy them from there (device to device; torch.cuda.graph has
    // synchronised the device before capturing, and those bytes never change). A
    // pinned allocation inside a capture fails on some torch versions.
    for (auto& [where, other] : caches) {
      if (where.first == device.index() && where.second != stream && !table.source.defined()) {
        for (const DeviceTable& t : other) {
          if (t.filled && t.key == table.key) {
            table.source = t.device;   // held: the graph's copy reads it at every replay
            break;
          }
        }
      }
    }
  }
  if (!table.source.defined()) {
    table.staging = at::empty({static_cast<int64_t>(table.key.size())},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(table.staging.data_ptr(), table.key.data(), table.key.size());
  }
  table.device = at::empty({length}, at::TensorOptions().dtype(at::kByte).device(device));
  upload(table);
  cache.push_front(std::move(table));
  // Forget the least recently used table that no captured graph refers to.
  if (cache.size() > kCachedTablesPerStream) {
    for (auto it = std::prev(cache.end()); it != cache.begin(); --it) {
      if (!it->captured) {
        cache.erase(it);
        break;
      }
    }
  }
  return pointers(cache.front());
}

}  // namespace

void run_rows(const RowsCall& call) {
  TORCH_CHECK(call.schedule_step.is_cuda(), "fused_adamw_: the CUDA path needs the schedule counter on the GPU");
  const at::Device device = call.schedule_step.device();
  TORCH_CHECK(call.hyper.is_cpu() || call.hyper.device() == device, "fused_adamw_: hyper must be on the CPU or on ",
              device, ", got ", call.hyper.device());
  TORCH_CHECK(call.layouts.empty(), "fused_adamw_: parameters that are not dense in memory, or whose gradient or "
              "state has other strides than the parameter, are not supported on CUDA yet");
  TORCH_CHECK(call.storage.is_plain() && !call.stochastic_rounding,
              "fused_adamw_: master weights, 16-bit moments, gradients in another dtype and stochastic rounding "
              "are not supported on CUDA yet");
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const bool hyper_on_host = call.hyper.is_cpu();
  const DeviceTablePointers table = device_table(call.rows, hyper_on_host ? &call.hyper : nullptr, device, stream);
  const double* hyper = hyper_on_host ? table.hyper : call.hyper.const_data_ptr<double>();
  const auto num_rows = static_cast<int64_t>(call.rows.size());
  dispatch_storage_type(call.dtype, [&](auto type_tag) {
    using scalar_t = decltype(type_tag);
    using opmath_t = typename MathType<scalar_t>::type;
    const KernelArgs args = make_kernel_args(table.rows, num_rows, call.total, hyper, table.coefficients,
                                             call.schedule_step, call.advance_schedule, call.grad_scale,
                                             call.found_inf, call.grad_clip);
    // One wave: as many blocks as can be resident at once (chunks are equal, so a
    // grid-stride loop over them balances), at least one (it advances the schedule).
    // Worked out before the first launch: nothing may throw between the two.
    const int64_t chunks = (call.total + kChunkElements - 1) / kChunkElements;
    const int64_t sms = multiprocessor_count(device.index());
    auto blocks = [&](int per_sm) {
      return static_cast<unsigned>(std::max<int64_t>(1, std::min(chunks, sms * per_sm)));
    };
    if (num_rows > 0) {
      const auto prepare_blocks = static_cast<unsigned>((num_rows + kThreadsPerBlock - 1) / kThreadsPerBlock);
      prepare_kernel<opmath_t><<<prepare_blocks, kThreadsPerBlock, 0, stream>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (call.amsgrad) {
      update_kernel<scalar_t, true>
          <<<blocks(min_blocks_per_sm<scalar_t, true>()), kThreadsPerBlock, 0, stream>>>(args);
    } else {
      update_kernel<scalar_t, false>
          <<<blocks(min_blocks_per_sm<scalar_t, false>()), kThreadsPerBlock, 0, stream>>>(args);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

TORCH_LIBRARY_IMPL(noam_ext, CUDA, m) {
  m.impl("fused_adamw_", &fused_adamw_op<&run_rows>);
}

}  // namespace noam_ext::cuda

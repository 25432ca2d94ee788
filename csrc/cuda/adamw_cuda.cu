// noam_ext::fused_adamw_ on CUDA: the whole AdamW + Noam step for one call's
// tensors in one launch, on the current stream, without any host
// synchronisation. The work split and the per-element math live in
// fused_adamw_plan.h / adamw_math.h, shared with the host emulation and the CPU op.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
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
  __device__ bool leader() const { return threadIdx.x == 0; }
  __device__ void sync() const { __syncthreads(); }
  template <typename F>
  __device__ void for_my_threads(F&& f) const { f(static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x)); }
};

// The whole step in one launch. Every block first updates its chunks (reading
// the old step counters); the last block to finish then advances the counters,
// found by a blocks-done counter in schedule_step[1] that it resets to zero.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock) fused_adamw_kernel(const KernelArgs args,
                                                                        int64_t* schedule_step) {
  __shared__ SegmentShared<typename MathType<scalar_t>::type> shared;
  __shared__ bool last_block;
  DeviceExec exec;
  run_block<scalar_t>(args, exec, shared);
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();  // this block's reads of the counters happen before it is counted
    auto* done = reinterpret_cast<unsigned long long*>(schedule_step + 1);
    last_block = atomicAdd(done, 1ULL) == gridDim.x - 1;
  }
  __syncthreads();
  if (last_block) {
    __threadfence();
    advance_steps(args, schedule_step, threadIdx.x, blockDim.x);
    if (threadIdx.x == 0) {
      schedule_step[1] = 0;
    }
  }
}

int multiprocessor_count(int device) {
  static int counts[64] = {0};
  if (device < 64 && counts[device] > 0) {
    return counts[device];
  }
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (device < 64) {
    counts[device] = count;
  }
  return count;
}

// Device copies of recent tensor tables, per (device, stream). Uploading a table
// is a stream-ordered copy from pinned memory (no host sync); in steady-state
// training the tensors, and so the table, are the same every step, and it is
// uploaded once. A table used while a CUDA graph is captured is kept for the
// life of the process: the graph replays its kernel (and, if it was uploaded
// during capture, its copy) with those addresses.
struct DeviceTable {
  std::vector<TensorRow> rows;
  at::Tensor staging;   // pinned host copy the upload reads
  at::Tensor device;
  bool captured = false;
};

constexpr size_t kCachedTablesPerStream = 8;

const TensorRow* device_rows(const std::vector<TensorRow>& rows, const at::Device& device, cudaStream_t stream) {
  static std::mutex mutex;
  static std::map<std::pair<int, cudaStream_t>, std::list<DeviceTable>> caches;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  const bool capturing = capture != cudaStreamCaptureStatusNone;
  const size_t bytes = rows.size() * sizeof(TensorRow);

  std::lock_guard<std::mutex> lock(mutex);
  auto& cache = caches[{device.index(), stream}];
  for (auto it = cache.begin(); it != cache.end(); ++it) {
    if (it->rows.size() == rows.size() && std::memcmp(it->rows.data(), rows.data(), bytes) == 0) {
      it->captured |= capturing;
      cache.splice(cache.begin(), cache, it);  // most recently used first
      return static_cast<const TensorRow*>(cache.front().device.const_data_ptr());
    }
  }
  DeviceTable table;
  table.rows = rows;
  table.captured = capturing;
  const auto length = static_cast<int64_t>(bytes);
  table.staging = at::empty({length}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(table.staging.data_ptr(), rows.data(), bytes);
  table.device = at::empty({length}, at::TensorOptions().dtype(at::kByte).device(device));
  table.device.copy_(table.staging, /*non_blocking=*/true);  // on the current stream, as the launch
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
  return static_cast<const TensorRow*>(cache.front().device.const_data_ptr());
}


}  // namespace

void run_rows(const RowsCall& call) {
  TORCH_CHECK(call.schedule_step.is_cuda(), "fused_adamw_: the CUDA path needs the schedule counter on the GPU");
  const at::Device device = call.schedule_step.device();
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const TensorRow* table = call.rows.empty() ? nullptr : device_rows(call.rows, device, stream);
  const int64_t chunks = (call.total + kChunkElements - 1) / kChunkElements;
  const int64_t max_blocks = static_cast<int64_t>(multiprocessor_count(device.index())) * 8;
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min(chunks, max_blocks)));
  dispatch_storage_type(call.dtype, [&](auto type_tag) {
    using scalar_t = decltype(type_tag);
    const KernelArgs args = make_kernel_args(table, static_cast<int64_t>(call.rows.size()), call.total, call.amsgrad,
                                             call.schedule_step, call.hyper, call.advance_schedule, call.grad_scale,
                                             call.found_inf, call.grad_clip);
    fused_adamw_kernel<scalar_t>
        <<<blocks, kThreadsPerBlock, 0, stream>>>(args, call.schedule_step.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

TORCH_LIBRARY_IMPL(noam_ext, CUDA, m) {
  m.impl("fused_adamw_", &fused_adamw_op<&run_rows>);
}

}  // namespace noam_ext::cuda

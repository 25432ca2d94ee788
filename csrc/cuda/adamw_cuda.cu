// noam_ext::fused_adamw_ on CUDA: the whole AdamW + Noam step for one flat
// buffer, on the current stream, without any host synchronisation. The work
// split and the per-element math live in fused_adamw_plan.h / adamw_math.h,
// shared with the host emulation and the CPU op.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>

#include "../noam_ext/op_checks.h"
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
__global__ void __launch_bounds__(kThreadsPerBlock) fused_adamw_kernel(const KernelArgs<scalar_t> args,
                                                                        float* param_steps,
                                                                        int64_t* schedule_step) {
  __shared__ SegmentShared<typename MathType<scalar_t>::type> shared;
  __shared__ bool last_block;
  DeviceExec exec;
  run_block(args, exec, shared);
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();  // this block's reads of the counters happen before it is counted
    auto* done = reinterpret_cast<unsigned long long*>(schedule_step + 1);
    last_block = atomicAdd(done, 1ULL) == gridDim.x - 1;
  }
  __syncthreads();
  if (last_block) {
    __threadfence();
    advance_steps(param_steps, schedule_step, args.active, args.found_inf, args.num_segments, threadIdx.x,
                  blockDim.x);
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

void fused_adamw_cuda(
    const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
    const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& max_exp_avg_sq,
    const at::Tensor& param_steps, const at::Tensor& schedule_step, const at::Tensor& segments,
    const at::Tensor& hyper, const std::optional<at::Tensor>& active,
    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  check_fused_adamw_args(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, param_steps, schedule_step,
                         segments, hyper, active, grad_scale, found_inf);
  const c10::cuda::CUDAGuard guard(param.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(param.get_device()).stream();
  const int64_t chunks = (param.numel() + kChunkElements - 1) / kChunkElements;
  const int64_t max_blocks = static_cast<int64_t>(multiprocessor_count(param.get_device())) * 8;
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min(chunks, max_blocks)));
  dispatch_storage_type(param.scalar_type(), [&](auto type_tag) {
    using scalar_t = decltype(type_tag);
    const auto args = make_kernel_args<scalar_t>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, param_steps,
                                                 schedule_step, segments, hyper, active, grad_scale, found_inf);
    fused_adamw_kernel<scalar_t><<<blocks, kThreadsPerBlock, 0, stream>>>(
        args, param_steps.data_ptr<float>(), schedule_step.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(noam_ext, CUDA, m) {
  m.impl("fused_adamw_", &fused_adamw_cuda);
}

}  // namespace noam_ext::cuda

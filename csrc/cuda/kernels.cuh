// The CUDA kernels of fused_adamw_ and the grid they are launched with, in one
// header that two translation units compile:
//  - csrc/cuda/adamw_cuda.cu, with nvcc, for the GPU (run_rows launches them);
//  - tests/host_run/host_run.cpp, as plain C++ after tests/host_run/cuda_host_shims.h, which
//    defines __global__, threadIdx, blockIdx, the vector load/store intrinsics and so
//    on for the host; it runs every (block, thread) of the same launches one after
//    another, so that CI runs this very code, the kernels' own, without a GPU.
// Nothing here may depend on which of the two compiles it: the kernel bodies, the
// device branches of the vector accesses (vector_access.cuh) and the grid sizing are
// the same text for both.
#pragma once

#include "kernels_namespace.h"

#include <cstdint>

#include "call_args.cuh"
#include "launch_policy.cuh"
#include "multi_tensor_walk.cuh"

namespace noam_ext::cuda_plan {
inline namespace NOAM_EXT_KERNELS_COPY {

// The block the calling thread belongs to, for run_block (multi_tensor_walk.cuh).
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

// Launch 2: the update for kSupportedStorage[kStorage] (storage.h), compiled for
// min_blocks_per_sm resident blocks per SM.
template <int kStorage, bool amsgrad>
__global__ void __launch_bounds__(kThreadsPerBlock, min_blocks_per_sm<kStorage, amsgrad>())
    update_kernel(const KernelArgs args) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    advance_schedule_counter(args);
  }
  run_block<kStorage, amsgrad, false>(args, DeviceExec{});
}

// Launch 3, only for a call with strided rows (work_split.h, StridedLayout), after the
// update: those rows, element by element through their layouts. 2 resident blocks: at
// ptxas' default of 64 registers its index arithmetic spills (8-20 bytes, sm_90), and
// at 2 blocks it needs 84-90.
template <int kStorage, bool amsgrad>
__global__ void __launch_bounds__(kThreadsPerBlock, 2) strided_kernel(const KernelArgs args) {
  run_block<kStorage, amsgrad, true>(args, DeviceExec{});
}

using KernelFunction = void (*)(KernelArgs);

struct KernelLaunch {
  KernelFunction kernel = nullptr;
  unsigned blocks = 0;     // 0: nothing to launch
  unsigned threads = 0;
};

// A call's launches, in order.
struct StepLaunches {
  KernelLaunch prepare;    // no blocks when the call has no rows
  KernelLaunch update;     // always at least one block: it advances the schedule
  KernelLaunch strided;    // no blocks when the call has no strided rows
  int64_t chunk_elements;  // KernelArgs::chunk_elements for the update and strided launches
};

// Elements per chunk: kChunkElements, or, for a call too small to give each resident
// block a chunk that big, what spreads it over all of them (a call of 1000 tensors of
// 3 elements is one 16384-element chunk, one block on one SM, at kChunkElements), in
// multiples of kMinChunkElements. Large calls keep kChunkElements.
inline int64_t update_chunk_elements(int64_t total, int64_t resident_blocks) {
  const int64_t per_block = (total + resident_blocks - 1) / resident_blocks;
  const int64_t rounded = (per_block + kMinChunkElements - 1) / kMinChunkElements * kMinChunkElements;
  return rounded < kMinChunkElements ? kMinChunkElements : rounded > kChunkElements ? kChunkElements : rounded;
}

// The update grid: one wave, as many blocks as can be resident at once (chunks are
// equal, so a grid-stride loop over them balances), at most one per chunk, at least one.
inline unsigned update_grid_blocks(int64_t total, int64_t chunk_elements, int64_t resident_blocks) {
  const int64_t chunks = (total + chunk_elements - 1) / chunk_elements;
  const int64_t blocks = chunks < resident_blocks ? chunks : resident_blocks;
  return static_cast<unsigned>(blocks > 1 ? blocks : 1);
}

template <int kStorage, bool amsgrad>
StepLaunches step_launches_for(int64_t num_rows, int64_t total, int64_t multiprocessors, bool strided_rows) {
  using opmath_t = typename StorageTraits<kStorage>::opmath_t;
  StepLaunches l;
  l.prepare.kernel = &prepare_kernel<opmath_t>;
  l.prepare.blocks = static_cast<unsigned>((num_rows + kThreadsPerBlock - 1) / kThreadsPerBlock);
  l.prepare.threads = kThreadsPerBlock;
  l.update.kernel = &update_kernel<kStorage, amsgrad>;
  const int64_t resident = multiprocessors * min_blocks_per_sm<kStorage, amsgrad>();
  l.chunk_elements = update_chunk_elements(total, resident);
  l.update.blocks = update_grid_blocks(total, l.chunk_elements, resident);
  l.update.threads = kThreadsPerBlock;
  l.strided.kernel = &strided_kernel<kStorage, amsgrad>;
  l.strided.blocks = strided_rows ? l.update.blocks : 0;
  l.strided.threads = kThreadsPerBlock;
  return l;
}

}  // inline namespace NOAM_EXT_KERNELS_COPY
}  // namespace noam_ext::cuda_plan

// The kernels' shape, fixed at compile time: the block and vector sizes, how chunks of
// the call's tensors are sized, and per storage of csrc/noam_ext/storage.h its C++
// types and the register policy (resident blocks per SM, steps in flight) that
// scripts/check_cuda_kernels.py holds the compiled kernels to.
#pragma once

#include "kernels_namespace.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../noam_ext/storage.h"

namespace noam_ext::cuda_plan {
inline namespace NOAM_EXT_KERNELS_COPY {

constexpr int kVecBytes = 16;
constexpr int kThreadsPerBlock = 256;
constexpr int kWarpSize = 32;
constexpr int64_t kChunkElements = 16384;
// The smallest chunk (update_chunk_elements): a chunk of a small call is still a few
// 16-byte steps for each of a block's threads.
constexpr int64_t kMinChunkElements = 1024;

// The C++ types of kSupportedStorage[kStorage], and what follows from them.
template <int kStorage>
struct StorageTraits {
  static constexpr StorageTypes kTypes = kSupportedStorage[kStorage];
  using param_t = storage_t<kTypes.param>;
  using grad_t = storage_t<kTypes.grad>;
  // 8-bit moments (quantized_walk.cuh) are stored as uint8 codes and held as floats between
  // decoding and encoding: moment_t is what the update reads and writes, code_t what is stored.
  static constexpr bool kQuantized = kTypes.quantized();
  using code_t = storage_t<kTypes.moment>;
  using moment_t = std::conditional_t<kQuantized, float, code_t>;
  static constexpr MasterKind kMaster = kTypes.master;
  using master_t = std::conditional_t<kMaster == MasterKind::kRemainder, int16_t, float>;
  using opmath_t = std::conditional_t<std::is_same_v<param_t, double>, double, float>;
  static constexpr bool kPlain = kTypes.is_plain();
  // With a float32 master the parameter is only written: the master holds its value.
  static constexpr bool kReadsParam = kMaster != MasterKind::kFloat32;
  static constexpr bool kCanRound = kTypes.stores_bfloat16();
  static constexpr int kNarrowest = static_cast<int>(
      std::min({sizeof(param_t), sizeof(grad_t), sizeof(code_t),
                kMaster == MasterKind::kNone ? sizeof(double) : sizeof(master_t)}));
  // Elements per step: one 16-byte vector of the narrowest tensor.
  static constexpr int kWidth = kVecBytes / kNarrowest;
};

// 8-bit moments (quantized_walk.cuh): a lane holds 8 elements of every moment as floats
// between the update and the encoding (a block's scale needs all of them first), 24 with
// amsgrad, besides its 8 parameters, gradients and masters while it updates them: 2 resident
// blocks (128 registers a thread; at 3, 80 registers, ptxas spilled 64-212 bytes, sm_90).
constexpr int kQuantizedBlocksPerSm = 2;

// Resident blocks of kThreadsPerBlock threads per SM that the update kernel is
// compiled for (__launch_bounds__; CI fails the build on any register spill):
//  - 4 (at most 64 registers a thread) for float, bfloat16 and float16 storage:
//    1024 threads, each with 2 x 16 bytes of every tensor in flight, 128 KiB of
//    loads per SM, enough to keep a Hopper SM's share of HBM bandwidth busy;
//  - 3 (85 registers) with amsgrad: its fifth tensor does not fit 64 registers
//    (ptxas for sm_90 at 4 blocks: 16-40 bytes of spill stores a thread, i.e. local
//    memory traffic in a kernel bound by memory traffic); 768 threads with 5 x 2
//    vectors in flight are 120 KiB per SM, as much as 4 blocks without amsgrad;
//  - 2 for double, whose math needs twice the registers (not a training dtype);
//  - the low-byte storages (the rest of storage.h's list) as float storage: their steps
//    hold 8 elements of 16-bit and 32-bit tensors mixed, one step in flight
//    (unroll_for), about as many bytes as two steps of float; but float16 parameters
//    with a float32 master, 3 with or without amsgrad: at 64 registers their
//    conversions spill (ptxas: 4-12 bytes stored, 28-36 loaded a thread, sm_80 and sm_90).
template <int kStorage, bool amsgrad>
constexpr int min_blocks_per_sm() {
  using S = StorageTraits<kStorage>;
  if constexpr (S::kQuantized) {
    return kQuantizedBlocksPerSm;
  }
  if constexpr (std::is_same_v<typename S::param_t, c10::Half> && S::kMaster != MasterKind::kNone) {
    return 3;
  }
  return sizeof(typename S::param_t) == 8 ? 2 : amsgrad ? 3 : 4;
}

// Steps of each tensor in flight per thread: 2, but 1 for double with amsgrad, which
// spills at 2 within its 128 registers (ptxas, sm_80: 24 bytes), and 1 for the mixed
// storages, whose one step already moves 8 elements of up to four 32-bit tensors.
template <int kStorage, bool amsgrad>
constexpr int unroll_for() {
  using S = StorageTraits<kStorage>;
  if constexpr (!S::kPlain) {
    return 1;
  } else {
    return (amsgrad && sizeof(typename S::param_t) == 8) ? 1 : 2;
  }
}

// A row's part of a chunk is updated by one warp when one unrolled pass of the warp
// covers it.
template <int kStorage>
constexpr int64_t warp_part_max_elements() {
  return static_cast<int64_t>(kWarpSize) * StorageTraits<kStorage>::kWidth * unroll_for<kStorage, false>();
}

}  // inline namespace NOAM_EXT_KERNELS_COPY
}  // namespace noam_ext::cuda_plan

// What nvcc gives the CUDA kernels, defined for the host, so that
// csrc/cuda/kernels.cuh compiles as plain C++ in tests/host_run/host_run.cpp:
//  - __global__, __device__ and __launch_bounds__ mean nothing on the host;
//  - threadIdx, blockIdx, blockDim and gridDim are thread-local and set by the
//    host launch loop before it calls a kernel for one (block, thread);
//  - uint4 and uint2, and the PTX of the 16- and 8-byte vector accesses (vector_access.cuh's
//    ld_global_v4, st_global_v4, ld_global_v2, st_global_v2): they do what
//    ld.global.v4.b32 / st.global.v4.b32 (.v2) do, after checking the alignment the GPU
//    would fault on, and count the 16-byte vectors moved;
//  - WarpLanes: a warp's lanes, run together by one emulated thread (below).
// Include this first, and only in that one file.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>

#define NOAM_EXT_KERNELS_ON_HOST 1
#define __global__
#define __device__
#define __launch_bounds__(...)

namespace noam_ext::cuda_plan {

struct HostDim3 {
  unsigned int x = 1, y = 1, z = 1;   // as CUDA's uint3 / dim3: 32-bit unsigned
};

inline thread_local HostDim3 threadIdx, blockIdx, blockDim, gridDim;

struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};

struct alignas(8) uint2 {
  unsigned int x, y;
};

// The 16-byte vectors moved by the host run's current launch loop.
struct VectorCounts {
  int64_t loads = 0;
  int64_t stores = 0;
};

inline thread_local VectorCounts vector_counts;

// A vector access of `bytes` bytes, which the GPU would fault on unless aligned to them.
inline void check_alignment(const void* p, int bytes, const char* what) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(p) % bytes == 0, "host run of the CUDA kernels: a ", bytes, "-byte ", what,
              " at ", p, ", which is not ", bytes, "-byte aligned (the GPU would fault)");
}

inline uint4 ld_global_v4(const void* p) {
  check_alignment(p, 16, "load");
  uint4 value;
  std::memcpy(&value, p, sizeof(value));
  ++vector_counts.loads;
  return value;
}

inline void st_global_v4(void* p, const uint4& value) {
  check_alignment(p, 16, "store");
  std::memcpy(p, &value, sizeof(value));
  ++vector_counts.stores;
}

// The 8-byte accesses of 8-bit codes (not counted: the counts are of 16-byte vectors).
inline uint2 ld_global_v2(const void* p) {
  check_alignment(p, 8, "load");
  uint2 value;
  std::memcpy(&value, p, sizeof(value));
  return value;
}

inline void st_global_v2(void* p, const uint2& value) {
  check_alignment(p, 8, "store");
  std::memcpy(p, &value, sizeof(value));
}

// A warp's lanes (csrc/cuda/quantized_walk.cuh), which exchange values by shuffles on the GPU:
// here the call of lane 0 runs all 32 lanes of its warp, phase by phase, and the calls of
// the other lanes do nothing. group_reduce gives each lane op over its group of kGroup
// lanes, as the GPU's xor shuffles do (op is exact, commutative and associative: the largest
// magnitude, NaN winning), so the order of the fold does not change the result.
struct WarpLanes {
  static constexpr int kHeld = 32;
  int own_lane;
  explicit WarpLanes(int lane) : own_lane(lane) {}
  bool runs_warp() const { return own_lane == 0; }
  int lane(int held) const { return held; }
  template <int kGroup, typename Op>
  void group_reduce(float (&values)[kHeld], Op op) const {
    static_assert(kHeld % kGroup == 0, "groups of lanes tile the warp");
    for (int first = 0; first < kHeld; first += kGroup) {
      float folded = values[first];
      for (int k = first + 1; k < first + kGroup; ++k) {
        folded = op(folded, values[k]);
      }
      for (int k = first; k < first + kGroup; ++k) {
        values[k] = folded;
      }
    }
  }
};

}  // namespace noam_ext::cuda_plan

// What nvcc gives the CUDA kernels, defined for the host, so that
// csrc/cuda/kernels.cuh compiles as plain C++ in tests/host_run/host_run.cpp:
//  - __global__, __device__ and __launch_bounds__ mean nothing on the host;
//  - threadIdx, blockIdx, blockDim and gridDim are thread-local and set by the
//    host launch loop before it calls a kernel for one (block, thread);
//  - uint4, and the PTX of the 16-byte vector accesses (vector_access.cuh's
//    ld_global_v4, st_global_v4): they do what ld.global.v4.b32 / st.global.v4.b32
//    do, after checking the 16-byte alignment the GPU would fault on, and count the
//    vectors moved.
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

// The 16-byte vectors moved by the host run's current launch loop.
struct VectorCounts {
  int64_t loads = 0;
  int64_t stores = 0;
};

inline thread_local VectorCounts vector_counts;

inline void check_vector_alignment(const void* p, const char* what) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(p) % 16 == 0, "host run of the CUDA kernels: a 16-byte ", what, " at ",
              p, ", which is not 16-byte aligned (the GPU would fault)");
}

inline uint4 ld_global_v4(const void* p) {
  check_vector_alignment(p, "load");
  uint4 value;
  std::memcpy(&value, p, sizeof(value));
  ++vector_counts.loads;
  return value;
}

inline void st_global_v4(void* p, const uint4& value) {
  check_vector_alignment(p, "store");
  std::memcpy(p, &value, sizeof(value));
  ++vector_counts.stores;
}

}  // namespace noam_ext::cuda_plan

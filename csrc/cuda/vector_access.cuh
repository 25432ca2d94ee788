// 16-byte vector loads and stores of the kernels, and packs of them (the elements of one
// step of a tensor). On the GPU they are single 128-bit PTX accesses; the host run of the
// kernels (tests/host_run/cuda_host_shims.h) gives ld_global_v4 and st_global_v4 host
// definitions that check the alignment the GPU would fault on and count the vectors.
#pragma once

#include "kernels_namespace.h"

#include <c10/macros/Macros.h>

#include <cstring>

#include "launch_policy.cuh"


// Code for the GPU: compiled by nvcc for a device, or as host C++ for the host run of
// the kernels, which defines NOAM_EXT_KERNELS_ON_HOST and host versions of the few CUDA
// builtins used here (tests/host_run/cuda_host_shims.h).
#if defined(__CUDA_ARCH__) || defined(NOAM_EXT_KERNELS_ON_HOST)
#define NOAM_EXT_DEVICE_CODE 1
#endif

namespace noam_ext::cuda_plan {
inline namespace NOAM_EXT_KERNELS_COPY {

template <typename scalar_t>
struct alignas(kVecBytes) Vec {
  static constexpr int kWidth = kVecBytes / sizeof(scalar_t);
  scalar_t v[kWidth];
};

// One 16-byte load and store per vector, written in PTX: from C++ (a uint4 store,
// even with the alignment asserted) NVVM split the one-vector tail loop's stores into
// four 32-bit ones, and the SASS check (scripts/check_cuda_kernels.py) wants every
// STG to be one 128-bit store. The asm states what it does to memory: both clobber
// "memory", so the compiler neither moves nor merges a load across a store (a later
// pass over the same vectors in one launch stays correct), and the store is volatile.
// The load is not volatile: a volatile asm pins the order of the unrolled loads, and
// 7 of the 8 update kernels then spilled (up to 168 bytes stored and 588 loaded per
// thread, ptxas sm_90); CUDA's cache-operator intrinsics (__ldca ...) are volatile asm.
// No streaming hint (.cs, evict first): the next forward pass reads the parameters
// again, and only a GPU measurement could show a gain.
// The host run of the kernels (tests/host_run/cuda_host_shims.h) defines ld_global_v4 and
// st_global_v4 for the host: they check the 16-byte alignment the GPU would fault on,
// and count the vectors moved.
#if defined(__CUDA_ARCH__)
__device__ C10_ALWAYS_INLINE uint4 ld_global_v4(const void* p) {
  uint4 raw;
  asm("ld.global.v4.b32 {%0, %1, %2, %3}, [%4];"
      : "=r"(raw.x), "=r"(raw.y), "=r"(raw.z), "=r"(raw.w)
      : "l"(p)
      : "memory");
  return raw;
}

__device__ C10_ALWAYS_INLINE void st_global_v4(void* p, const uint4& raw) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(raw.x), "r"(raw.y), "r"(raw.z),
               "r"(raw.w)
               : "memory");
}

// 8 bytes at once: a lane's codes of one 8-bit moment (quantized_walk.cuh), as above.
__device__ C10_ALWAYS_INLINE uint2 ld_global_v2(const void* p) {
  uint2 raw;
  asm("ld.global.v2.b32 {%0, %1}, [%2];" : "=r"(raw.x), "=r"(raw.y) : "l"(p) : "memory");
  return raw;
}

__device__ C10_ALWAYS_INLINE void st_global_v2(void* p, const uint2& raw) {
  asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(p), "r"(raw.x), "r"(raw.y) : "memory");
}
#endif

template <typename scalar_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE Vec<scalar_t> load_vec(const scalar_t* p) {
  static_assert(sizeof(Vec<scalar_t>) == kVecBytes, "a vector is 16 bytes");
#if defined(NOAM_EXT_DEVICE_CODE)
  const uint4 raw = ld_global_v4(p);
  Vec<scalar_t> out;
  memcpy(&out, &raw, sizeof(out));
  return out;
#else
  static_assert(sizeof(scalar_t) == 0, "16-byte vectors exist only in code for the GPU");
#endif
}

template <typename scalar_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void store_vec(scalar_t* p, const Vec<scalar_t>& value) {
#if defined(NOAM_EXT_DEVICE_CODE)
  uint4 raw;
  memcpy(&raw, &value, sizeof(raw));
  st_global_v4(p, raw);
#else
  static_assert(sizeof(scalar_t) == 0, "16-byte vectors exist only in code for the GPU");
#endif
}

// Eight 8-bit codes, loaded and stored as one 8-byte access (quantized_walk.cuh).
struct alignas(8) Codes8 {
  uint8_t v[8];
  C10_HOST_DEVICE C10_ALWAYS_INLINE uint8_t& operator[](int k) { return v[k]; }
};

template <typename T = uint8_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE Codes8 load_codes8(const T* p) {
#if defined(NOAM_EXT_DEVICE_CODE)
  const uint2 raw = ld_global_v2(p);
  Codes8 out;
  memcpy(&out, &raw, sizeof(out));
  return out;
#else
  static_assert(sizeof(T) == 0, "8-byte code vectors exist only in code for the GPU");
#endif
}

template <typename T = uint8_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void store_codes8(T* p, const Codes8& value) {
#if defined(NOAM_EXT_DEVICE_CODE)
  uint2 raw;
  memcpy(&raw, &value, sizeof(raw));
  st_global_v2(p, raw);
#else
  static_assert(sizeof(T) == 0, "8-byte code vectors exist only in code for the GPU");
#endif
}

// E elements of one tensor: E x sizeof(T) / 16 vectors (E is a step: 16 bytes of the
// narrowest tensor of the row, so a multiple of 16 bytes of every tensor).
template <typename T, int E>
struct Pack {
  static constexpr int kPerVec = Vec<T>::kWidth;
  static constexpr int kVecs = E / kPerVec;
  static_assert(kVecs * kPerVec == E, "a step is whole vectors of every tensor");
  Vec<T> vec[kVecs];
  C10_HOST_DEVICE C10_ALWAYS_INLINE T& operator[](int k) { return vec[k / kPerVec].v[k % kPerVec]; }
};

// In place of a pack of a tensor a storage does not have (no master): one unused element.
template <typename T>
struct NoPack {
  T unused;
  C10_HOST_DEVICE C10_ALWAYS_INLINE T& operator[](int) { return unused; }
};

template <int E, typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE Pack<T, E> load_pack(const T* p) {
  Pack<T, E> out;
#pragma unroll
  for (int j = 0; j < Pack<T, E>::kVecs; ++j) {
    out.vec[j] = load_vec(p + j * Pack<T, E>::kPerVec);
  }
  return out;
}

template <int E, typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE void store_pack(T* p, const Pack<T, E>& value) {
#pragma unroll
  for (int j = 0; j < Pack<T, E>::kVecs; ++j) {
    store_vec(p + j * Pack<T, E>::kPerVec, value.vec[j]);
  }
}

}  // inline namespace NOAM_EXT_KERNELS_COPY
}  // namespace noam_ext::cuda_plan

// The CUDA kernels' work split, written as host/device code: csrc/cuda/kernels.cuh
// wraps it in the kernels, which nvcc compiles for the GPU and the host run of the
// kernels (tests/host_run/host_run.cpp) compiles as plain C++, launching them over
// every (block, thread) of the grid that the GPU launch would use; CI tests that bit
// for bit against the CPU op without a GPU.
//
// A call is two launches on the current stream:
//  1. prepare (one thread per row): the row's AdamW coefficients for this step
//     (two double pow() per row, once per (row, step), not per block or chunk), from
//     its group's row of the hyperparameter table in device memory, and where its
//     16-byte vectors start (vector_head_bytes), written to a per-row buffer; then the
//     row's step count is advanced (unless GradScaler skips the step).
//  2. update: the virtual index space of the call's tensors (work_split.h) is cut
//     into chunks of kChunkElements (fewer for a small call, so that it spreads over
//     the SMs: update_chunk_elements in kernels.cuh); blocks take chunks grid-stride; within a chunk
//     the rows it overlaps are walked in order. A row's part of the chunk is updated
//     by the whole block, or, when it is small, by one warp (the k-th small part of
//     a chunk by warp k mod warps), so that a chunk of many tiny tensors keeps every
//     warp busy. No thread waits for another: every thread reads the coefficients
//     it needs from the prepare pass's buffer, and there is no barrier at all.
//     Within a part, each thread takes steps of Traits::kWidth elements, 16 bytes of the
//     narrowest tensor and as many 16-byte vectors of each wider one (kVecBytes),
//     unroll_for<kStorage, amsgrad>() steps in flight, and the last partial step element
//     by element. A row of a tensor that is not dense or laid out like its parameter
//     (work_split.h, StridedLayout) is walked element by element through its layout.
//  A call's storage (csrc/noam_ext/storage.h: the dtypes of parameter, gradient and
//  moments, and a master) is a template parameter of the update kernel, one kernel per
//  supported combination; stochastic rounding is a flag of the call. Virtual offsets are multiples of kRowAlignElements and chunk starts
//     multiples of kMinChunkElements, so a part starts where its tensor's pointers have the
//     same position within 16 bytes as at element 0. When some number of leading elements
//     brings every pointer of a row to a 16-byte boundary together (aligned tensors, and
//     views that start at the same element of equally aligned buffers, of any element
//     sizes), a part's first few elements, up to that boundary, are updated one by one and
//     the rest in aligned vectors; a row whose pointers no head aligns takes the element
//     path (vector_head_elements). Offsets are 64-bit
//     throughout.
#pragma once

#include "kernels_namespace.h"

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include <type_traits>

#include "../noam_ext/adamw_math.h"
#include "../noam_ext/storage.h"
#include "../noam_ext/work_split.h"

// Code for the GPU: compiled by nvcc for a device, or as host C++ for the host run of
// the kernels, which defines NOAM_EXT_KERNELS_ON_HOST and host versions of the few CUDA
// builtins used here (tests/host_run/cuda_host_shims.h).
#if defined(__CUDA_ARCH__) || defined(NOAM_EXT_KERNELS_ON_HOST)
#define NOAM_EXT_DEVICE_CODE 1
#endif

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
  using moment_t = storage_t<kTypes.moment>;
  static constexpr MasterKind kMaster = kTypes.master;
  using master_t = std::conditional_t<kMaster == MasterKind::kRemainder, int16_t, float>;
  using opmath_t = std::conditional_t<std::is_same_v<param_t, double>, double, float>;
  static constexpr bool kPlain = kTypes.is_plain();
  // With a float32 master the parameter is only written: the master holds its value.
  static constexpr bool kReadsParam = kMaster != MasterKind::kFloat32;
  static constexpr bool kCanRound = kTypes.stores_bfloat16();
  static constexpr int kNarrowest = static_cast<int>(
      std::min({sizeof(param_t), sizeof(grad_t), sizeof(moment_t),
                kMaster == MasterKind::kNone ? sizeof(double) : sizeof(master_t)}));
  // Elements per step: one 16-byte vector of the narrowest tensor.
  static constexpr int kWidth = kVecBytes / kNarrowest;
};

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

template <typename scalar_t>
struct MathType { using type = float; };
template <>
struct MathType<double> { using type = double; };

// What the prepare pass computes for a row and the update pass reads.
template <typename opmath_t>
struct alignas(16) RowCoefficients {
  AdamWCoefficients<opmath_t> coefficients;
  int32_t maximize;
  int32_t vector_head;          // vector_head_elements() of the row
  // Stochastic rounding (adamw_math.h): the keys of the row's two draws for the high 32
  // bits `key_index_high` of its elements' indices, and what other high bits need.
  int32_t stochastic_rounding;
  uint32_t key_param_and_exp_avg;
  uint32_t key_exp_avg_sq_and_max;
  uint32_t key_index_high;
  float rounding_step;          // the parameter's step count after this step
  uint64_t rng_stream;
  int64_t element_offset;
};

// Everything both launches need; passed by value. The tables live in memory the
// kernels can read (device memory for the GPU, host memory for the emulation), so
// a call may hold any number of tensors and of param groups.
struct KernelArgs {
  const TensorRow* rows;
  const StridedLayout* layouts;  // of the rows whose layout is not -1
  int64_t num_rows;
  int64_t total;                 // length of the virtual index space
  const double* hyper;           // [groups, kNumHyperColumns] (adamw_math.h)
  int64_t* schedule_step;        // [0] completed steps: read by prepare, advanced by update
  const float* grad_scale;       // null: no AMP scaling
  const float* found_inf;        // null: never skip
  const double* grad_clip;       // null: no clipping factor
  void* coefficients;            // [num_rows] RowCoefficients<opmath_t>: prepare writes, update reads
  int64_t chunk_elements;        // elements per chunk of the update launch (update_chunk_elements)
  int8_t element_sizes[kRowTensors];   // bytes per element of each of a row's tensors (work_split.h's
                                       // RowTensor order; 0: the storage has no master)
  bool advance_schedule;
  bool stochastic_rounding;
};

C10_HOST_DEVICE inline bool step_skipped(const KernelArgs& a) {
  return a.found_inf != nullptr && *a.found_inf != 0.0f;
}

// Where a row's 16-byte vectors start, in elements: -1 for the element path (a strided
// row, or pointers that no number of leading elements brings to a 16-byte boundary
// together), otherwise the fewest leading elements after which every pointer of the row
// is 16-byte aligned (0 when all are). A step is 16 bytes of the narrowest tensor and so
// whole 16-byte vectors of each wider one: from there on every step is aligned in all of
// them. That covers views that start at the same element of equally aligned buffers,
// whatever their element sizes (a bfloat16 parameter and float32 moments one element
// into flat buffers: 7 elements, then vectors). A part of the row starting at a
// multiple of kRowAlignElements elements has the same head.
C10_HOST_DEVICE inline int32_t vector_head_elements(const TensorRow& r, const int8_t* element_sizes) {
  if (r.layout >= 0) {
    return -1;
  }
  const void* const pointers[kRowTensors] = {r.param, r.grad, r.exp_avg, r.exp_avg_sq, r.max_exp_avg_sq, r.master};
  int32_t narrowest = kVecBytes;
  for (int t = 0; t < kRowTensors; ++t) {
    if (pointers[t] != nullptr && element_sizes[t] > 0 && element_sizes[t] < narrowest) {
      narrowest = element_sizes[t];
    }
  }
  for (int32_t head = 0; head < kVecBytes / narrowest; ++head) {
    bool aligned = true;
    for (int t = 0; t < kRowTensors; ++t) {
      if (pointers[t] != nullptr && element_sizes[t] > 0) {
        aligned = aligned && (reinterpret_cast<uintptr_t>(pointers[t]) + static_cast<uintptr_t>(head) *
                              static_cast<uintptr_t>(element_sizes[t])) % kVecBytes == 0;
      }
    }
    if (aligned) {
      return head;
    }
  }
  return -1;
}

// Prepare pass, row i: its coefficients from the step counts before this step,
// then its step count advanced (torch increments state["step"] before it reads it
// for the bias corrections; coefficients_for adds the 1 itself). Rows are
// independent: each has its own step tensor (one call never holds one twice).
template <typename opmath_t>
C10_HOST_DEVICE inline void prepare_row(const KernelArgs& a, int64_t i) {
  const TensorRow& row = a.rows[i];
  const double* hyper = a.hyper + static_cast<int64_t>(row.group) * kNumHyperColumns;
  RowCoefficients<opmath_t> out;
  out.coefficients = coefficients_for<opmath_t>(hyper, *a.schedule_step, *row.step);
  out.maximize = hyper[kMaximize] != 0.0;
  out.vector_head = vector_head_elements(row, a.element_sizes);
  out.stochastic_rounding = a.stochastic_rounding ? 1 : 0;
  out.rounding_step = *row.step + 1.0f;
  out.rng_stream = row.rng_stream;
  out.element_offset = row.element_offset;
  out.key_index_high = static_cast<uint32_t>(static_cast<uint64_t>(row.element_offset) >> 32);
  out.key_param_and_exp_avg = rounding_key(row.rng_stream, out.rounding_step, kParamAndExpAvg, out.key_index_high);
  out.key_exp_avg_sq_and_max = rounding_key(row.rng_stream, out.rounding_step, kExpAvgSqAndMax, out.key_index_high);
  static_cast<RowCoefficients<opmath_t>*>(a.coefficients)[i] = out;
  if (!step_skipped(a)) {
    *row.step += 1.0f;
  }
}

// The schedule counts optimizer steps, skipped ones too (as the CPU op). Done by
// one thread of the update launch: the prepare launch, which reads it, has finished.
C10_HOST_DEVICE inline void advance_schedule_counter(const KernelArgs& a) {
  if (a.advance_schedule) {
    a.schedule_step[0] += 1;
  }
}

// What every gradient is divided by (GradScaler's scale) and then multiplied by
// (the clipping factor), in the math type; the flags say whether to at all.
template <typename opmath_t>
struct GradFactors {
  opmath_t divisor;
  opmath_t multiplier;
  bool unscale;
  bool clip;
};

template <typename opmath_t>
C10_HOST_DEVICE inline GradFactors<opmath_t> grad_factors(const KernelArgs& a) {
  GradFactors<opmath_t> f;
  f.unscale = a.grad_scale != nullptr;
  f.divisor = f.unscale ? static_cast<opmath_t>(*a.grad_scale) : opmath_t(1);
  f.clip = a.grad_clip != nullptr;
  f.multiplier = f.clip ? static_cast<opmath_t>(*a.grad_clip) : opmath_t(1);
  return f;
}

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

// A bfloat16 from a float that bfloat16 represents exactly (the rounding is done).
C10_HOST_DEVICE C10_ALWAYS_INLINE c10::BFloat16 exact_bfloat16(float x) {
  return c10::BFloat16(x);   // to nearest even: exact for a bfloat16 value, a NaN stays a NaN
}

// One element: widen, update with the shared math, round or split once. `element` is
// its index within its row (stochastic rounding's index, with the row's offset).
template <int kStorage, bool amsgrad>
C10_HOST_DEVICE C10_ALWAYS_INLINE void update_element(
    typename StorageTraits<kStorage>::param_t& p, typename StorageTraits<kStorage>::grad_t g,
    typename StorageTraits<kStorage>::moment_t& m, typename StorageTraits<kStorage>::moment_t& v,
    typename StorageTraits<kStorage>::moment_t* vmax, typename StorageTraits<kStorage>::master_t* master,
    const RowCoefficients<typename StorageTraits<kStorage>::opmath_t>& c,
    const GradFactors<typename StorageTraits<kStorage>::opmath_t>& f, int64_t element) {
  using S = StorageTraits<kStorage>;
  using opmath_t = typename S::opmath_t;
  using param_t = typename S::param_t;
  using moment_t = typename S::moment_t;
  opmath_t param;
  if constexpr (S::kMaster == MasterKind::kFloat32) {
    param = *master;
  } else if constexpr (S::kMaster == MasterKind::kRemainder) {
    param = join_master(p.x, *master);
  } else {
    param = static_cast<opmath_t>(p);
  }
  opmath_t grad = static_cast<opmath_t>(g);
  opmath_t exp_avg = static_cast<opmath_t>(m);
  opmath_t exp_avg_sq = static_cast<opmath_t>(v);
  opmath_t max_sq = amsgrad ? static_cast<opmath_t>(*vmax) : opmath_t(0);
  grad = unscaled_clipped_grad(grad, f.unscale, f.divisor, f.clip, f.multiplier);
  adamw_update<amsgrad>(param, grad, exp_avg, exp_avg_sq, &max_sq, c.coefficients, c.maximize != 0);
  // Stochastic rounding's two draws for this element (only storages that store bfloat16).
  uint32_t draw_param_and_exp_avg = 0, draw_exp_avg_sq_and_max = 0;
  bool stochastic = false;
  if constexpr (S::kCanRound) {
    stochastic = c.stochastic_rounding != 0;
    if (stochastic) {
      const auto index = static_cast<uint64_t>(c.element_offset + element);
      const auto high = static_cast<uint32_t>(index >> 32);
      uint32_t key_a = c.key_param_and_exp_avg, key_b = c.key_exp_avg_sq_and_max;
      if (high != c.key_index_high) {   // a row past a multiple of 2**32 elements
        key_a = rounding_key(c.rng_stream, c.rounding_step, kParamAndExpAvg, high);
        key_b = rounding_key(c.rng_stream, c.rounding_step, kExpAvgSqAndMax, high);
      }
      draw_param_and_exp_avg = rounding_bits(key_a, static_cast<uint32_t>(index));
      if constexpr (std::is_same_v<moment_t, c10::BFloat16>) {
        draw_exp_avg_sq_and_max = rounding_bits(key_b, static_cast<uint32_t>(index));
      }
    }
  }
  if constexpr (S::kMaster == MasterKind::kFloat32) {
    *master = param;
    if constexpr (std::is_same_v<param_t, c10::BFloat16>) {
      p = exact_bfloat16(master_to_bfloat16_value(param));
    } else {
      p = static_cast<param_t>(param);   // float16: the master rounded to nearest even
    }
  } else if constexpr (S::kMaster == MasterKind::kRemainder) {
    const MasterSplit split = split_master(param);
    p = c10::BFloat16(split.param_bits, c10::BFloat16::from_bits());
    *master = split.remainder;
  } else if constexpr (std::is_same_v<param_t, c10::BFloat16>) {
    p = stochastic ? exact_bfloat16(stochastic_bfloat16_value(param, draw_param_and_exp_avg))
                   : static_cast<param_t>(param);
  } else {
    p = static_cast<param_t>(param);
  }
  if constexpr (std::is_same_v<moment_t, c10::BFloat16> && S::kCanRound) {
    if (stochastic) {
      m = exact_bfloat16(stochastic_bfloat16_value(exp_avg, draw_param_and_exp_avg >> 16));
      v = exact_bfloat16(stochastic_bfloat16_value(exp_avg_sq, draw_exp_avg_sq_and_max));
      if constexpr (amsgrad) {
        *vmax = exact_bfloat16(stochastic_bfloat16_value(max_sq, draw_exp_avg_sq_and_max >> 16));
      }
      return;
    }
  }
  m = static_cast<moment_t>(exp_avg);
  v = static_cast<moment_t>(exp_avg_sq);
  if constexpr (amsgrad) {
    *vmax = static_cast<moment_t>(max_sq);
  }
}

// The typed pointers of one row, from element `lo` on.
template <int kStorage>
struct RowPointers {
  using S = StorageTraits<kStorage>;
  typename S::param_t* param;
  const typename S::grad_t* grad;
  typename S::moment_t* exp_avg;
  typename S::moment_t* exp_avg_sq;
  typename S::moment_t* max_exp_avg_sq;
  typename S::master_t* master;
};

template <int kStorage, bool amsgrad>
C10_HOST_DEVICE C10_ALWAYS_INLINE RowPointers<kStorage> typed_from(const TensorRow& r, int64_t lo) {
  using S = StorageTraits<kStorage>;
  return {static_cast<typename S::param_t*>(r.param) + lo, static_cast<const typename S::grad_t*>(r.grad) + lo,
          static_cast<typename S::moment_t*>(r.exp_avg) + lo, static_cast<typename S::moment_t*>(r.exp_avg_sq) + lo,
          amsgrad ? static_cast<typename S::moment_t*>(r.max_exp_avg_sq) + lo : nullptr,
          S::kMaster != MasterKind::kNone ? static_cast<typename S::master_t*>(r.master) + lo : nullptr};
}

// Element i of a row's part (`first` is the part's first element within the row).
template <int kStorage, bool amsgrad>
C10_HOST_DEVICE C10_ALWAYS_INLINE void update_one(const RowPointers<kStorage>& a,
                                                  const RowCoefficients<typename StorageTraits<kStorage>::opmath_t>& c,
                                                  const GradFactors<typename StorageTraits<kStorage>::opmath_t>& f,
                                                  int64_t i, int64_t first) {
  update_element<kStorage, amsgrad>(a.param[i], a.grad[i], a.exp_avg[i], a.exp_avg_sq[i],
                                    amsgrad ? a.max_exp_avg_sq + i : nullptr,
                                    StorageTraits<kStorage>::kMaster != MasterKind::kNone ? a.master + i : nullptr,
                                    c, f, first + i);
}

// The tensors of one step of a row's part (kWidth elements of each).
template <int kStorage, bool amsgrad>
struct Step {
  using S = StorageTraits<kStorage>;
  static constexpr int E = S::kWidth;
  Pack<typename S::param_t, E> p;
  Pack<typename S::grad_t, E> g;
  Pack<typename S::moment_t, E> m, v, x;
  std::conditional_t<S::kMaster != MasterKind::kNone, Pack<typename S::master_t, E>, NoPack<typename S::master_t>>
      master;

  C10_HOST_DEVICE C10_ALWAYS_INLINE void load(const RowPointers<kStorage>& a, int64_t i) {
    if constexpr (S::kReadsParam) {
      p = load_pack<E>(a.param + i);
    }
    g = load_pack<E>(a.grad + i);
    m = load_pack<E>(a.exp_avg + i);
    v = load_pack<E>(a.exp_avg_sq + i);
    if constexpr (amsgrad) {
      x = load_pack<E>(a.max_exp_avg_sq + i);
    }
    if constexpr (S::kMaster != MasterKind::kNone) {
      master = load_pack<E>(a.master + i);
    }
  }

  C10_HOST_DEVICE C10_ALWAYS_INLINE void update(const RowCoefficients<typename S::opmath_t>& c,
                                                const GradFactors<typename S::opmath_t>& f, int64_t element) {
#pragma unroll
    for (int k = 0; k < E; ++k) {
      update_element<kStorage, amsgrad>(p[k], g[k], m[k], v[k], &x[k], &master[k], c, f, element + k);
    }
  }

  C10_HOST_DEVICE C10_ALWAYS_INLINE void store(const RowPointers<kStorage>& a, int64_t i) {
    store_pack<E>(a.param + i, p);
    store_pack<E>(a.exp_avg + i, m);
    store_pack<E>(a.exp_avg_sq + i, v);
    if constexpr (amsgrad) {
      store_pack<E>(a.max_exp_avg_sq + i, x);
    }
    if constexpr (S::kMaster != MasterKind::kNone) {
      store_pack<E>(a.master + i, master);
    }
  }
};

// Thread `t` of `num_threads` updates its share of elements [first, length) of a
// row's part, where every pointer is 16-byte aligned; `part_start` is the part's first
// element within the row. (Indices stay 64-bit: with 32-bit ones ptxas widens every
// address anew and needs more registers, measured on sm_90.)
template <int kStorage, bool amsgrad>
C10_HOST_DEVICE void update_range_vectorized(const RowPointers<kStorage>& a,
                                             const RowCoefficients<typename StorageTraits<kStorage>::opmath_t>& c,
                                             const GradFactors<typename StorageTraits<kStorage>::opmath_t>& f,
                                             int64_t first, int64_t length, int t, int num_threads,
                                             int64_t part_start) {
  constexpr int W = StorageTraits<kStorage>::kWidth;
  constexpr int kUnroll = unroll_for<kStorage, amsgrad>();
  const int64_t stride = static_cast<int64_t>(num_threads) * W;
  int64_t base = first + static_cast<int64_t>(t) * W;
  // Full steps, kUnroll independent ones loaded before any is computed.
  for (; base + (kUnroll - 1) * stride + W <= length; base += kUnroll * stride) {
    Step<kStorage, amsgrad> s[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      s[u].load(a, base + u * stride);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * stride;
      s[u].update(c, f, part_start + i);
      s[u].store(a, i);
    }
  }
  // Remaining steps one at a time; the last partial one element by element.
  for (; base < length; base += stride) {
    if (base + W <= length) {
      Step<kStorage, amsgrad> s;
      s.load(a, base);
      s.update(c, f, part_start + base);
      s.store(a, base);
    } else {
      for (int64_t i = base; i < length; ++i) {
        update_one<kStorage, amsgrad>(a, c, f, i, part_start);
      }
    }
  }
}

// The element path: thread t takes every num_threads-th element (adjacent threads,
// adjacent elements).
template <int kStorage, bool amsgrad>
C10_HOST_DEVICE void update_range_elementwise(const RowPointers<kStorage>& a,
                                              const RowCoefficients<typename StorageTraits<kStorage>::opmath_t>& c,
                                              const GradFactors<typename StorageTraits<kStorage>::opmath_t>& f,
                                              int64_t length, int t, int num_threads, int64_t part_start) {
  for (int64_t i = t; i < length; i += num_threads) {
    update_one<kStorage, amsgrad>(a, c, f, i, part_start);
  }
}

// A strided row's part [lo, hi): element by element, each tensor's element found
// through the row's layout (work_split.h). `a` points at the tensors' element 0.
template <int kStorage, bool amsgrad>
C10_HOST_DEVICE void update_range_strided(const RowPointers<kStorage>& a, const StridedLayout& layout,
                                          const RowCoefficients<typename StorageTraits<kStorage>::opmath_t>& c,
                                          const GradFactors<typename StorageTraits<kStorage>::opmath_t>& f,
                                          int64_t lo, int64_t hi, int t, int num_threads) {
  for (int64_t k = lo + t; k < hi; k += num_threads) {
    int64_t at[kRowTensors];
    strided_offsets(layout, k, at);
    update_element<kStorage, amsgrad>(a.param[at[kParamTensor]], a.grad[at[kGradTensor]],
                                      a.exp_avg[at[kExpAvgTensor]], a.exp_avg_sq[at[kExpAvgSqTensor]],
                                      amsgrad ? a.max_exp_avg_sq + at[kMaxExpAvgSqTensor] : nullptr,
                                      StorageTraits<kStorage>::kMaster != MasterKind::kNone
                                          ? a.master + at[kMasterTensor]
                                          : nullptr,
                                      c, f, k);
  }
}

// A row's part: its first elements up to the 16-byte boundary all its pointers share
// one per thread, the rest in aligned steps; or, when no step is aligned in all its
// pointers, element by element.
template <int kStorage, bool amsgrad>
C10_HOST_DEVICE void update_range(const RowPointers<kStorage>& a,
                                  const RowCoefficients<typename StorageTraits<kStorage>::opmath_t>& c,
                                  const GradFactors<typename StorageTraits<kStorage>::opmath_t>& f, int64_t length,
                                  int t, int num_threads, int64_t part_start) {
  if (c.vector_head < 0) {
    update_range_elementwise<kStorage, amsgrad>(a, c, f, length, t, num_threads, part_start);
    return;
  }
  const int64_t head = c.vector_head < length ? c.vector_head : length;
  // Fewer than 16 bytes' worth (at most 7 elements): one per thread of a block or warp.
  for (int64_t i = t; i < head; i += num_threads) {
    update_one<kStorage, amsgrad>(a, c, f, i, part_start);
  }
  update_range_vectorized<kStorage, amsgrad>(a, c, f, head, length, t, num_threads, part_start);
}

// Which threads update a row's part [lo, hi) of a chunk: the whole block, or,
// for a small part, only the warp `small_parts_before` mod warps (the count of
// small parts met earlier in the same chunk), as lanes 0..31.
struct PartAssignment {
  bool by_warp;
  int warp;
};

template <int kStorage>
C10_HOST_DEVICE inline PartAssignment assign_part(int64_t lo, int64_t hi, int64_t small_parts_before,
                                                  int num_threads) {
  const int warps = num_threads / kWarpSize;
  // With a single warp (or an emulated block narrower than two) the block is the warp.
  if (warps < 2 || hi - lo > warp_part_max_elements<kStorage>()) {
    return {false, 0};
  }
  return {true, static_cast<int>(small_parts_before % warps)};
}

// One block's whole update of the dense rows (kStridedRows false: the update kernel)
// or of the strided ones (true: the strided kernel, launched only for calls that have
// such rows, so that its element walk, with its 64-bit divisions, costs the dense
// kernel no registers). Exec abstracts the block: exec.block(), exec.num_blocks(),
// exec.num_threads(), and exec.for_my_threads(f), which calls f(thread) for the
// calling CUDA thread, or for every emulated one in turn.
template <int kStorage, bool amsgrad, bool kStridedRows, typename Exec>
C10_HOST_DEVICE void run_block(const KernelArgs& a, const Exec& exec) {
  using opmath_t = typename StorageTraits<kStorage>::opmath_t;
  if (step_skipped(a)) {
    return;  // GradScaler skipped this step: nothing changes
  }
  // Read once, held in registers (through the pointers the compiler would reload
  // them after every store, since they might alias the tensors).
  const GradFactors<opmath_t> factors = grad_factors<opmath_t>(a);
  const auto* all_coefficients = static_cast<const RowCoefficients<opmath_t>*>(a.coefficients);
  const int n = exec.num_threads();
  // Chunks grid-stride, walked by their first element (fewer live registers than a chunk
  // index and a count: the update kernels are compiled at their register budget).
  const int64_t chunk_elements = a.chunk_elements;
  const int64_t stride = chunk_elements * exec.num_blocks();
  for (int64_t begin = chunk_elements * exec.block(); begin < a.total; begin += stride) {
    const int64_t end = begin + chunk_elements < a.total ? begin + chunk_elements : a.total;
    int64_t small_parts = 0;
    for_each_row_in_range(a.rows, a.num_rows, begin, end, [&](int64_t i, int64_t lo, int64_t hi) {
      const PartAssignment part = assign_part<kStorage>(lo, hi, small_parts, n);
      small_parts += part.by_warp ? 1 : 0;
      const TensorRow& row = a.rows[i];
      if ((row.layout >= 0) != kStridedRows) {
        return;   // the other kernel's row
      }
      const RowCoefficients<opmath_t> c = all_coefficients[i];   // in registers, not reloaded after stores
      if constexpr (kStridedRows) {   // rare: a row that is not dense, or not laid out like its parameter
        const RowPointers<kStorage> base = typed_from<kStorage, amsgrad>(row, 0);
        const StridedLayout& layout = a.layouts[row.layout];
        exec.for_my_threads([&](int t) {
          if (!part.by_warp) {
            update_range_strided<kStorage, amsgrad>(base, layout, c, factors, lo, hi, t, n);
          } else if (t / kWarpSize == part.warp) {
            update_range_strided<kStorage, amsgrad>(base, layout, c, factors, lo, hi, t % kWarpSize, kWarpSize);
          }
        });
      } else {
        // lo is a multiple of kRowAlignElements: the vectors from it on stay aligned.
        const RowPointers<kStorage> pointers = typed_from<kStorage, amsgrad>(row, lo);
        const int64_t length = hi - lo;
        exec.for_my_threads([&](int t) {
          if (!part.by_warp) {
            update_range<kStorage, amsgrad>(pointers, c, factors, length, t, n, lo);
          } else if (t / kWarpSize == part.warp) {
            update_range<kStorage, amsgrad>(pointers, c, factors, length, t % kWarpSize, kWarpSize, lo);
          }
        });
      }
    });
  }
}

}  // inline namespace NOAM_EXT_KERNELS_COPY
}  // namespace noam_ext::cuda_plan

// The CUDA kernels' work split, written as host/device code: csrc/cuda/kernels.cuh
// wraps it in the kernels, which nvcc compiles for the GPU and the host run of the
// kernels (csrc/cpu/cuda_emulation.cpp) compiles as plain C++, launching them over
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
//     into chunks of kChunkElements; blocks take chunks grid-stride; within a chunk
//     the rows it overlaps are walked in order. A row's part of the chunk is updated
//     by the whole block, or, when it is small, by one warp (the k-th small part of
//     a chunk by warp k mod warps), so that a chunk of many tiny tensors keeps every
//     warp busy. No thread waits for another: every thread reads the coefficients
//     it needs from the prepare pass's buffer, and there is no barrier at all.
//     Within a part, each thread takes 16-byte vectors (kVecBytes),
//     unroll_for<scalar_t, amsgrad>() of them in flight, and the last partial vector element
//     by element. Virtual offsets are multiples of kRowAlignElements and chunk starts
//     multiples of kChunkElements, so a part starts where its tensor's pointers have the
//     same position within 16 bytes as at element 0. When every pointer of a row has the
//     same offset within 16 bytes (aligned tensors, and views that start at the same
//     element of equally aligned buffers), a part's first few elements, up to that
//     common boundary, are updated one by one and the rest in aligned vectors; a row
//     whose pointers have different offsets takes the element path. Offsets are 64-bit
//     throughout.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "../noam_ext/adamw_math.h"
#include "../noam_ext/work_split.h"

// Code for the GPU: compiled by nvcc for a device, or as host C++ for the host run of
// the kernels, which defines NOAM_EXT_KERNELS_ON_HOST and host versions of the few CUDA
// builtins used here (csrc/cpu/cuda_host_shims.h).
#if defined(__CUDA_ARCH__) || defined(NOAM_EXT_KERNELS_ON_HOST)
#define NOAM_EXT_DEVICE_CODE 1
#endif

namespace noam_ext::cuda_plan {

constexpr int kVecBytes = 16;
constexpr int kThreadsPerBlock = 256;
constexpr int kWarpSize = 32;
constexpr int64_t kChunkElements = 16384;

// Resident blocks of kThreadsPerBlock threads per SM that the update kernel is
// compiled for (__launch_bounds__; CI fails the build on any register spill):
//  - 4 (at most 64 registers a thread) for float, bfloat16 and float16 storage:
//    1024 threads, each with 2 x 16 bytes of every tensor in flight, 128 KiB of
//    loads per SM, enough to keep a Hopper SM's share of HBM bandwidth busy;
//  - 3 (85 registers) with amsgrad: its fifth tensor does not fit 64 registers
//    (ptxas for sm_90 at 4 blocks: 16-40 bytes of spill stores a thread, i.e. local
//    memory traffic in a kernel bound by memory traffic); 768 threads with 5 x 2
//    vectors in flight are 120 KiB per SM, as much as 4 blocks without amsgrad;
//  - 2 for double, whose math needs twice the registers (not a training dtype).
template <typename scalar_t, bool amsgrad>
constexpr int min_blocks_per_sm() {
  return sizeof(scalar_t) == 8 ? 2 : amsgrad ? 3 : 4;
}

// 16-byte vectors of each tensor in flight per thread: 2, but 1 for double with
// amsgrad, which spills at 2 within its 128 registers (ptxas, sm_80: 24 bytes).
template <typename scalar_t, bool amsgrad>
constexpr int unroll_for() {
  return (amsgrad && sizeof(scalar_t) == 8) ? 1 : 2;
}

// A row's part of a chunk is updated by one warp when one unrolled pass of the warp
// covers it.
template <typename scalar_t>
constexpr int64_t warp_part_max_elements() {
  return static_cast<int64_t>(kWarpSize) * (kVecBytes / static_cast<int>(sizeof(scalar_t))) *
         unroll_for<scalar_t, false>();
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
  int32_t vector_head_bytes;   // vector_head_bytes() of the row
};

// Everything both launches need; passed by value. The tables live in memory the
// kernels can read (device memory for the GPU, host memory for the emulation), so
// a call may hold any number of tensors and of param groups.
struct KernelArgs {
  const TensorRow* rows;
  int64_t num_rows;
  int64_t total;                 // length of the virtual index space
  const double* hyper;           // [groups, kNumHyperColumns] (adamw_math.h)
  int64_t* schedule_step;        // [0] completed steps: read by prepare, advanced by update
  const float* grad_scale;       // null: no AMP scaling
  const float* found_inf;        // null: never skip
  const double* grad_clip;       // null: no clipping factor
  void* coefficients;            // [num_rows] RowCoefficients<opmath_t>: prepare writes, update reads
  bool advance_schedule;
};

C10_HOST_DEVICE inline bool step_skipped(const KernelArgs& a) {
  return a.found_inf != nullptr && *a.found_inf != 0.0f;
}

// Where a row's 16-byte vectors start: -1 when its pointers lie at different offsets
// within 16 bytes (no vector is aligned in all of them: the element path), otherwise
// the bytes from each pointer to the next 16-byte boundary (0 when all are aligned), a
// multiple of the element size. A part of the row starting at a multiple of
// kRowAlignElements elements has the same head as the row.
C10_HOST_DEVICE inline int32_t vector_head_bytes(const TensorRow& r) {
  auto offset = [](const void* p) { return static_cast<int32_t>(reinterpret_cast<uintptr_t>(p) % kVecBytes); };
  const int32_t first = offset(r.param);
  const bool same = offset(r.grad) == first && offset(r.exp_avg) == first && offset(r.exp_avg_sq) == first &&
                    (r.max_exp_avg_sq == nullptr || offset(r.max_exp_avg_sq) == first);
  return same ? (kVecBytes - first) % kVecBytes : -1;
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
  out.vector_head_bytes = vector_head_bytes(row);
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
// The host run of the kernels (csrc/cpu/cuda_host_shims.h) defines ld_global_v4 and
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

// One element: widen, update with the shared math, round once.
template <bool amsgrad, typename scalar_t, typename opmath_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void update_element(
    scalar_t& p, scalar_t g, scalar_t& m, scalar_t& v, scalar_t* vmax,
    const RowCoefficients<opmath_t>& c, const GradFactors<opmath_t>& f) {
  opmath_t param = static_cast<opmath_t>(p);
  opmath_t grad = static_cast<opmath_t>(g);
  opmath_t exp_avg = static_cast<opmath_t>(m);
  opmath_t exp_avg_sq = static_cast<opmath_t>(v);
  opmath_t max_sq = amsgrad ? static_cast<opmath_t>(*vmax) : opmath_t(0);
  grad = unscaled_clipped_grad(grad, f.unscale, f.divisor, f.clip, f.multiplier);
  adamw_update<amsgrad>(param, grad, exp_avg, exp_avg_sq, &max_sq, c.coefficients, c.maximize != 0);
  p = static_cast<scalar_t>(param);
  m = static_cast<scalar_t>(exp_avg);
  v = static_cast<scalar_t>(exp_avg_sq);
  if constexpr (amsgrad) {
    *vmax = static_cast<scalar_t>(max_sq);
  }
}

// The typed pointers of one row, from element `lo` on.
template <typename scalar_t>
struct RowPointers {
  scalar_t* param;
  const scalar_t* grad;
  scalar_t* exp_avg;
  scalar_t* exp_avg_sq;
  scalar_t* max_exp_avg_sq;
};

template <typename scalar_t, bool amsgrad>
C10_HOST_DEVICE C10_ALWAYS_INLINE RowPointers<scalar_t> typed_from(const TensorRow& r, int64_t lo) {
  return {static_cast<scalar_t*>(r.param) + lo, static_cast<const scalar_t*>(r.grad) + lo,
          static_cast<scalar_t*>(r.exp_avg) + lo, static_cast<scalar_t*>(r.exp_avg_sq) + lo,
          amsgrad ? static_cast<scalar_t*>(r.max_exp_avg_sq) + lo : nullptr};
}

// One 16-byte vector of every tensor of a row at element i: load, update, store.
template <bool amsgrad, typename scalar_t, typename opmath_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void update_vector(const RowPointers<scalar_t>& a,
                                                     const RowCoefficients<opmath_t>& c,
                                                     const GradFactors<opmath_t>& f, int64_t i) {
  constexpr int W = Vec<scalar_t>::kWidth;
  Vec<scalar_t> p = load_vec(a.param + i), g = load_vec(a.grad + i);
  Vec<scalar_t> m = load_vec(a.exp_avg + i), v = load_vec(a.exp_avg_sq + i), x;
  if constexpr (amsgrad) {
    x = load_vec(a.max_exp_avg_sq + i);
  }
#pragma unroll
  for (int k = 0; k < W; ++k) {
    update_element<amsgrad>(p.v[k], g.v[k], m.v[k], v.v[k], &x.v[k], c, f);
  }
  store_vec(a.param + i, p);
  store_vec(a.exp_avg + i, m);
  store_vec(a.exp_avg_sq + i, v);
  if constexpr (amsgrad) {
    store_vec(a.max_exp_avg_sq + i, x);
  }
}

// Thread `t` of `num_threads` updates its share of elements [first, length) of a
// row's part, where every pointer is 16-byte aligned. (Indices stay 64-bit: with
// 32-bit ones ptxas widens every address anew and needs more registers, measured on
// sm_90.)
template <bool amsgrad, typename scalar_t, typename opmath_t>
C10_HOST_DEVICE void update_range_vectorized(const RowPointers<scalar_t>& a, const RowCoefficients<opmath_t>& c,
                                             const GradFactors<opmath_t>& f, int64_t first, int64_t length, int t,
                                             int num_threads) {
  constexpr int W = Vec<scalar_t>::kWidth;
  constexpr int kUnroll = unroll_for<scalar_t, amsgrad>();
  const int64_t stride = static_cast<int64_t>(num_threads) * W;
  int64_t base = first + static_cast<int64_t>(t) * W;
  // Full vectors, kUnroll independent ones loaded before any is computed.
  for (; base + (kUnroll - 1) * stride + W <= length; base += kUnroll * stride) {
    Vec<scalar_t> p[kUnroll], g[kUnroll], m[kUnroll], v[kUnroll], x[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * stride;
      p[u] = load_vec(a.param + i);
      g[u] = load_vec(a.grad + i);
      m[u] = load_vec(a.exp_avg + i);
      v[u] = load_vec(a.exp_avg_sq + i);
      if constexpr (amsgrad) {
        x[u] = load_vec(a.max_exp_avg_sq + i);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int k = 0; k < W; ++k) {
        update_element<amsgrad>(p[u].v[k], g[u].v[k], m[u].v[k], v[u].v[k], &x[u].v[k], c, f);
      }
      const int64_t i = base + u * stride;
      store_vec(a.param + i, p[u]);
      store_vec(a.exp_avg + i, m[u]);
      store_vec(a.exp_avg_sq + i, v[u]);
      if constexpr (amsgrad) {
        store_vec(a.max_exp_avg_sq + i, x[u]);
      }
    }
  }
  // Remaining vectors one at a time; the last partial one element by element.
  for (; base < length; base += stride) {
    if (base + W <= length) {
      update_vector<amsgrad>(a, c, f, base);
    } else {
      for (int64_t i = base; i < length; ++i) {
        update_element<amsgrad>(a.param[i], a.grad[i], a.exp_avg[i], a.exp_avg_sq[i],
                                amsgrad ? a.max_exp_avg_sq + i : nullptr, c, f);
      }
    }
  }
}

// The same for a row whose pointers lie at different offsets within 16 bytes:
// element by element, thread t taking every num_threads-th element (adjacent
// threads, adjacent elements).
template <bool amsgrad, typename scalar_t, typename opmath_t>
C10_HOST_DEVICE void update_range_elementwise(const RowPointers<scalar_t>& a, const RowCoefficients<opmath_t>& c,
                                              const GradFactors<opmath_t>& f, int64_t length, int t, int num_threads) {
  for (int64_t i = t; i < length; i += num_threads) {
    update_element<amsgrad>(a.param[i], a.grad[i], a.exp_avg[i], a.exp_avg_sq[i],
                            amsgrad ? a.max_exp_avg_sq + i : nullptr, c, f);
  }
}

// A row's part: its first elements up to the 16-byte boundary all its pointers share
// one per thread, the rest in aligned vectors; or, when its pointers lie at different
// offsets within 16 bytes, element by element.
template <bool amsgrad, typename scalar_t, typename opmath_t>
C10_HOST_DEVICE void update_range(const RowPointers<scalar_t>& a, const RowCoefficients<opmath_t>& c,
                                  const GradFactors<opmath_t>& f, int64_t length, int t, int num_threads) {
  if (c.vector_head_bytes < 0) {
    update_range_elementwise<amsgrad>(a, c, f, length, t, num_threads);
    return;
  }
  const int64_t head_elements = c.vector_head_bytes / static_cast<int32_t>(sizeof(scalar_t));
  const int64_t head = head_elements < length ? head_elements : length;
  // Fewer than 16 bytes' worth (at most 7 elements): one per thread of a block or warp.
  for (int64_t i = t; i < head; i += num_threads) {
    update_element<amsgrad>(a.param[i], a.grad[i], a.exp_avg[i], a.exp_avg_sq[i],
                            amsgrad ? a.max_exp_avg_sq + i : nullptr, c, f);
  }
  update_range_vectorized<amsgrad>(a, c, f, head, length, t, num_threads);
}

// Which threads update a row's part [lo, hi) of a chunk: the whole block, or,
// for a small part, only the warp `small_parts_before` mod warps (the count of
// small parts met earlier in the same chunk), as lanes 0..31.
struct PartAssignment {
  bool by_warp;
  int warp;
};

template <typename scalar_t>
C10_HOST_DEVICE inline PartAssignment assign_part(int64_t lo, int64_t hi, int64_t small_parts_before,
                                                  int num_threads) {
  const int warps = num_threads / kWarpSize;
  // With a single warp (or an emulated block narrower than two) the block is the warp.
  if (warps < 2 || hi - lo > warp_part_max_elements<scalar_t>()) {
    return {false, 0};
  }
  return {true, static_cast<int>(small_parts_before % warps)};
}

// One block's whole update. Exec abstracts the block: exec.block(),
// exec.num_blocks(), exec.num_threads(), and exec.for_my_threads(f), which calls
// f(thread) for the calling CUDA thread, or for every emulated one in turn.
template <typename scalar_t, bool amsgrad, typename Exec>
C10_HOST_DEVICE void run_block(const KernelArgs& a, const Exec& exec) {
  using opmath_t = typename MathType<scalar_t>::type;
  if (step_skipped(a)) {
    return;  // GradScaler skipped this step: nothing changes
  }
  // Read once, held in registers (through the pointers the compiler would reload
  // them after every store, since they might alias the tensors).
  const GradFactors<opmath_t> factors = grad_factors<opmath_t>(a);
  const auto* all_coefficients = static_cast<const RowCoefficients<opmath_t>*>(a.coefficients);
  const int n = exec.num_threads();
  const int64_t num_chunks = (a.total + kChunkElements - 1) / kChunkElements;
  for (int64_t chunk = exec.block(); chunk < num_chunks; chunk += exec.num_blocks()) {
    const int64_t begin = chunk * kChunkElements;
    const int64_t end = begin + kChunkElements < a.total ? begin + kChunkElements : a.total;
    int64_t small_parts = 0;
    for_each_row_in_range(a.rows, a.num_rows, begin, end, [&](int64_t i, int64_t lo, int64_t hi) {
      const PartAssignment part = assign_part<scalar_t>(lo, hi, small_parts, n);
      small_parts += part.by_warp ? 1 : 0;
      // lo is a multiple of kRowAlignElements: the vectors from it on stay aligned.
      const RowPointers<scalar_t> pointers = typed_from<scalar_t, amsgrad>(a.rows[i], lo);
      const int64_t length = hi - lo;
      const RowCoefficients<opmath_t> c = all_coefficients[i];   // in registers, not reloaded after stores
      exec.for_my_threads([&](int t) {
        if (!part.by_warp) {
          update_range<amsgrad>(pointers, c, factors, length, t, n);
        } else if (t / kWarpSize == part.warp) {
          update_range<amsgrad>(pointers, c, factors, length, t % kWarpSize, kWarpSize);
        }
      });
    });
  }
}

}  // namespace noam_ext::cuda_plan

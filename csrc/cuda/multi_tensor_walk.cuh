// The multi-tensor walk and block schedule of the update kernel, written as host/device
// code: csrc/cuda/kernels.cuh wraps it in the kernels, which nvcc compiles for the GPU and the host run of the
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

#include <cstdint>

#include "../noam_ext/work_split.h"
#include "call_args.cuh"
#include "element_update.cuh"
#include "launch_policy.cuh"
#include "quantized_walk.cuh"

namespace noam_ext::cuda_plan {
inline namespace NOAM_EXT_KERNELS_COPY {

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
C10_HOST_DEVICE void run_element_block(const KernelArgs& a, const Exec& exec) {
  using opmath_t = typename StorageTraits<kStorage>::opmath_t;
  if (step_skipped(a)) {
    return;  // GradScaler skipped this step: nothing changes
  }
  // Read once, held in registers (through the pointers the compiler would reload
  // them after every store, since they might alias the tensors).
  const GradFactors<opmath_t> factors = grad_factors<opmath_t>(a);
  const auto* all_coefficients = static_cast<const RowCoefficients<opmath_t>*>(a.coefficients);
  const int n = exec.num_threads();
  for_each_chunk_of_block(a, exec, [&](int64_t begin, int64_t end) {
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
  });
}

// The block's update: 8-bit moments a 256-element block per warp (quantized_walk.cuh),
// every other storage element-wise as above.
template <int kStorage, bool amsgrad, bool kStridedRows, typename Exec>
C10_HOST_DEVICE void run_block(const KernelArgs& a, const Exec& exec) {
  if constexpr (StorageTraits<kStorage>::kQuantized) {
    run_quantized_block<kStorage, amsgrad, kStridedRows>(a, exec);
  } else {
    run_element_block<kStorage, amsgrad, kStridedRows>(a, exec);
  }
}

}  // inline namespace NOAM_EXT_KERNELS_COPY
}  // namespace noam_ext::cuda_plan

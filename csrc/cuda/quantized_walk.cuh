// The update kernels' walk for 8-bit moments (storage.h's quantized storages, quantization.h):
// each block of kQuantBlock = 256 elements of a row is decoded, updated, given its new scale
// (the largest magnitude of its new moments) and encoded to the nearest codes by one warp, 8
// consecutive elements a lane. A lane's 8 codes of a moment are one 8-byte access, its float32
// parameters two 16-byte vectors. The scale needs every new moment of the block first: a lane
// keeps its 8 new moments of each in registers, the warp takes the largest magnitude by
// shuffles (NaN wins, so that a block with a NaN moment decodes to NaN, as on the CPU), and
// then each lane encodes its 8. (16 elements a lane, with 16-byte code vectors, needed more
// than 128 registers with amsgrad or a float32 master: ptxas spilled at 2 blocks per SM.)
//
// Rows of a call with 8-bit moments start at multiples of kQuantBlock in the virtual index
// space (op_checks.h, row_alignment) and chunks at multiples of kMinChunkElements, so a row's
// part of a chunk is whole blocks (its last one the row's tail block, which may be short, as
// on the CPU: csrc/cpu/segment_kernel_impl.h, update_quantized).
//
// A warp's lanes exchange values, which the host run of the kernels, calling one emulated
// thread after another, cannot do thread by thread: there the call of lane 0 runs the 32 lanes
// phase by phase (WarpLanes, tests/host_run/cuda_host_shims.h), with the same functions per
// lane (update_lane, encode_lane) that each GPU thread runs for its own lane.
#pragma once

#include "kernels_namespace.h"

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "../noam_ext/quantization_math.h"
#include "../noam_ext/storage.h"
#include "../noam_ext/work_split.h"
#include "call_args.cuh"
#include "element_update.cuh"
#include "launch_policy.cuh"
#include "vector_access.cuh"

namespace noam_ext::cuda_plan {
inline namespace NOAM_EXT_KERNELS_COPY {

constexpr int kQuantLaneElements = 8;   // 8 bytes of codes
constexpr int kLanesPerQuantBlock = static_cast<int>(kQuantBlock) / kQuantLaneElements;
static_assert(kLanesPerQuantBlock == kWarpSize, "a warp takes a block");
static_assert(kMinChunkElements % kQuantBlock == 0, "chunks start on a block");
// Moment k's map (quantization.h): the signed one for exp_avg (k = 0), as storage.h says.
static_assert(kQuantizedSigned[0] && !kQuantizedSigned[1] && !kQuantizedSigned[2], "exp_avg's map is signed");
C10_HOST_DEVICE constexpr bool signed_map(int k) { return k == 0; }

#if !defined(NOAM_EXT_KERNELS_ON_HOST)
// On the GPU a thread is one lane of its warp. (The host run defines its own WarpLanes.)
struct WarpLanes {
  static constexpr int kHeld = 1;   // lanes this thread runs
  int own_lane;
  C10_HOST_DEVICE explicit WarpLanes(int lane) : own_lane(lane) {}
  C10_HOST_DEVICE bool runs_warp() const { return true; }
  C10_HOST_DEVICE int lane(int) const { return own_lane; }
  // Each lane's value replaced by op over its group of kGroup lanes (kGroup a power of two).
  template <int kGroup, typename Op>
  C10_HOST_DEVICE void group_reduce(float (&values)[kHeld], Op op) const {
#if defined(__CUDA_ARCH__)
#pragma unroll
    for (int offset = kGroup / 2; offset > 0; offset /= 2) {
      values[0] = op(values[0], __shfl_xor_sync(0xffffffffu, values[0], offset));
    }
#endif
  }
};
#endif

// The larger of two magnitudes, NaN if either is NaN (fmaxf would drop a NaN).
C10_HOST_DEVICE inline float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }
struct NanMax {
  C10_HOST_DEVICE float operator()(float a, float b) const { return nan_max(a, b); }
};

template <int kStorage>
struct QuantizedRowPointers {
  using S = StorageTraits<kStorage>;
  typename S::param_t* param;
  const typename S::grad_t* grad;
  uint8_t* codes[3];    // exp_avg, exp_avg_sq, max_exp_avg_sq (null without amsgrad)
  typename S::master_t* master;
  float* absmax[3];     // their scales, one per block
};

template <int kStorage>
C10_HOST_DEVICE inline QuantizedRowPointers<kStorage> quantized_row(const TensorRow& r) {
  using S = StorageTraits<kStorage>;
  return {static_cast<typename S::param_t*>(r.param),
          static_cast<const typename S::grad_t*>(r.grad),
          {static_cast<uint8_t*>(r.exp_avg), static_cast<uint8_t*>(r.exp_avg_sq),
           static_cast<uint8_t*>(r.max_exp_avg_sq)},
          static_cast<typename S::master_t*>(r.master),
          {r.absmax[0], r.absmax[1], r.absmax[2]}};
}

// One lane's new moments, between its update and its encoding.
template <bool amsgrad>
struct QuantizedLane {
  static constexpr int kMoments = amsgrad ? 3 : 2;
  float moment[kMoments][kQuantLaneElements];
  float peak[kMoments];   // the largest magnitude of each (NaN if any is NaN)
};

// Where element k (within the row; the walk's index for a strided row) of each tensor lives.
C10_HOST_DEVICE inline void element_offsets(const StridedLayout* layout, int64_t k, int64_t (&at)[kRowTensors]) {
  if (layout != nullptr) {
    strided_offsets(*layout, k, at);
    return;
  }
  for (int t = 0; t < kRowTensors; ++t) {
    at[t] = k;
  }
}

// f(e) for each of a lane's elements e: unrolled in the update kernel, so that a lane's moments
// stay in registers; a loop in the strided kernel, whose element offsets (a division per
// dimension) unrolled eight times spilled at 128 registers (ptxas, sm_90, amsgrad): there a
// lane's moments live in local memory.
template <bool kStrided, typename F>
C10_HOST_DEVICE C10_ALWAYS_INLINE void for_lane_elements(F&& f) {
  if constexpr (kStrided) {
#pragma unroll 1
    for (int e = 0; e < kQuantLaneElements; ++e) {
      f(e);
    }
  } else {
#pragma unroll
    for (int e = 0; e < kQuantLaneElements; ++e) {
      f(e);
    }
  }
}

// Phase 1 of a lane: its `count` elements from `first` decoded, updated with the shared math
// (element_update.cuh), the parameters (and masters) stored, the new moments kept. `vectorized`:
// the row is dense and every pointer 16-byte aligned at element 0 (its vector head is 0), so
// a whole lane's tensors are vectors (16 bytes; 8 of codes); otherwise (a misaligned or strided row, or the
// lane of a tail block that is not whole) element by element.
template <int kStorage, bool amsgrad, bool kStrided>
C10_HOST_DEVICE C10_ALWAYS_INLINE void update_lane(const QuantizedRowPointers<kStorage>& r,
                                                   const StridedLayout* layout, bool vectorized,
                                                   const RowCoefficients<float>& c, const GradFactors<float>& f,
                                                   int64_t first, int count, QuantizedLane<amsgrad>& s) {
  using S = StorageTraits<kStorage>;
  constexpr int E = kQuantLaneElements;
  constexpr int K = QuantizedLane<amsgrad>::kMoments;
  float scale[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    scale[k] = count > 0 ? r.absmax[k][first / kQuantBlock] : 0.0f;
    s.peak[k] = 0.0f;
  }
  if (vectorized && count == E) {
    Pack<typename S::param_t, E> p;
    if constexpr (S::kReadsParam) {
      p = load_pack<E>(r.param + first);
    }
    Pack<typename S::grad_t, E> g = load_pack<E>(r.grad + first);
    Codes8 codes[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      codes[k] = load_codes8(r.codes[k] + first);
    }
    std::conditional_t<S::kMaster != MasterKind::kNone, Pack<typename S::master_t, E>,
                       NoPack<typename S::master_t>>
        master;
    if constexpr (S::kMaster != MasterKind::kNone) {
      master = load_pack<E>(r.master + first);
    }
#pragma unroll
    for (int e = 0; e < E; ++e) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        s.moment[k][e] = quantization_math::map_value(signed_map(k), codes[k][e]) * scale[k];
      }
      update_element<kStorage, amsgrad>(p[e], g[e], s.moment[0][e], s.moment[1][e],
                                        amsgrad ? &s.moment[K - 1][e] : nullptr, &master[e], c, f, first + e);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        s.peak[k] = nan_max(s.peak[k], fabsf(s.moment[k][e]));
      }
    }
    store_pack<E>(r.param + first, p);
    if constexpr (S::kMaster != MasterKind::kNone) {
      store_pack<E>(r.master + first, master);
    }
    return;
  }
  for_lane_elements<kStrided>([&](int e) {
    if (e >= count) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        s.moment[k][e] = 0.0f;
      }
      return;
    }
    int64_t at[kRowTensors];
    element_offsets(layout, first + e, at);
    typename S::param_t p = S::kReadsParam ? r.param[at[kParamTensor]] : typename S::param_t(0.0f);
    const int64_t code_at[3] = {at[kExpAvgTensor], at[kExpAvgSqTensor], at[kMaxExpAvgSqTensor]};
#pragma unroll
    for (int k = 0; k < K; ++k) {
      s.moment[k][e] = quantization_math::map_value(signed_map(k), r.codes[k][code_at[k]]) * scale[k];
    }
    typename S::master_t* master = S::kMaster != MasterKind::kNone ? r.master + at[kMasterTensor] : nullptr;
    update_element<kStorage, amsgrad>(p, r.grad[at[kGradTensor]], s.moment[0][e], s.moment[1][e],
                                      amsgrad ? &s.moment[K - 1][e] : nullptr, master, c, f, first + e);
    r.param[at[kParamTensor]] = p;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      s.peak[k] = nan_max(s.peak[k], fabsf(s.moment[k][e]));
    }
  });
}

// Phase 2 of a lane: its new moments encoded with their block's new scales (`peak`, the
// largest magnitude over the block), which the block's first lane stores.
template <int kStorage, bool amsgrad, bool kStrided>
C10_HOST_DEVICE C10_ALWAYS_INLINE void encode_lane(const QuantizedRowPointers<kStorage>& r,
                                                   const StridedLayout* layout, bool vectorized, int64_t first,
                                                   int count, const QuantizedLane<amsgrad>& s,
                                                   const float (&peak)[QuantizedLane<amsgrad>::kMoments],
                                                   bool first_lane_of_block) {
  constexpr int E = kQuantLaneElements;
  constexpr int K = QuantizedLane<amsgrad>::kMoments;
  if (count <= 0) {
    return;
  }
  // (x * 1 is x: the prescale changes only a block whose scale is subnormal, exactly.)
  BlockScale b[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    b[k] = quantization_math::block_scale(peak[k]);
  }
  if (vectorized && count == E) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      Codes8 codes;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        codes[e] = static_cast<uint8_t>(
            quantization_math::encode_moment(signed_map(k), s.moment[k][e] * b[k].prescale, b[k].reciprocal));
      }
      store_codes8(r.codes[k] + first, codes);
    }
  } else {
    for_lane_elements<kStrided>([&](int e) {
      if (e >= count) {
        return;
      }
      int64_t at[kRowTensors];
      element_offsets(layout, first + e, at);
      const int64_t code_at[3] = {at[kExpAvgTensor], at[kExpAvgSqTensor], at[kMaxExpAvgSqTensor]};
#pragma unroll
      for (int k = 0; k < K; ++k) {
        r.codes[k][code_at[k]] = static_cast<uint8_t>(
            quantization_math::encode_moment(signed_map(k), s.moment[k][e] * b[k].prescale, b[k].reciprocal));
      }
    });
  }
  if (first_lane_of_block) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      r.absmax[k][first / kQuantBlock] = peak[k];
    }
  }
}

// The elements of a lane that starts at `first`, in a part ending at `end`: 0 to 8.
C10_HOST_DEVICE inline int lane_count(int64_t first, int64_t end) {
  const int64_t n = end - first;
  return n <= 0 ? 0 : n >= kQuantLaneElements ? kQuantLaneElements : static_cast<int>(n);
}

// The block from `block_first` (within the row) of a part ending at `end`, by the warp's
// lanes: every lane of the warp takes part (the shuffles need all 32), those past the end
// with nothing to do.
template <int kStorage, bool amsgrad, bool kStrided, typename Lanes>
C10_HOST_DEVICE C10_ALWAYS_INLINE void update_block(const QuantizedRowPointers<kStorage>& r,
                                                   const StridedLayout* layout, bool vectorized,
                                                   const RowCoefficients<float>& c, const GradFactors<float>& f,
                                                   int64_t block_first, int64_t end, const Lanes& lanes) {
  constexpr int K = QuantizedLane<amsgrad>::kMoments;
  constexpr int H = Lanes::kHeld;
  QuantizedLane<amsgrad> s[H];
#pragma unroll
  for (int h = 0; h < H; ++h) {
    const int64_t first = block_first + static_cast<int64_t>(lanes.lane(h)) * kQuantLaneElements;
    update_lane<kStorage, amsgrad, kStrided>(r, layout, vectorized, c, f, first, lane_count(first, end), s[h]);
  }
  float peaks[K][H];
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int h = 0; h < H; ++h) {
      peaks[k][h] = s[h].peak[k];
    }
    lanes.template group_reduce<kLanesPerQuantBlock>(peaks[k], NanMax{});
  }
#pragma unroll
  for (int h = 0; h < H; ++h) {
    const int lane = lanes.lane(h);
    const int64_t first = block_first + static_cast<int64_t>(lane) * kQuantLaneElements;
    float peak[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      peak[k] = peaks[k][h];
    }
    encode_lane<kStorage, amsgrad, kStrided>(r, layout, vectorized, first, lane_count(first, end), s[h], peak,
                                   lane % kLanesPerQuantBlock == 0);
  }
}

// run_block (multi_tensor_walk.cuh) for 8-bit moments: the chunks grid-stride as there; in a
// chunk, the blocks of its rows' parts go to the block's warps in turn (block q of the chunk
// to warp q mod warps), so a chunk of many small tensors keeps every warp busy.
template <int kStorage, bool amsgrad, bool kStridedRows, typename Exec>
C10_HOST_DEVICE void run_quantized_block(const KernelArgs& a, const Exec& exec) {
  if (step_skipped(a)) {
    return;  // GradScaler skipped this step: nothing changes
  }
  const GradFactors<float> factors = grad_factors<float>(a);
  const auto* all_coefficients = static_cast<const RowCoefficients<float>*>(a.coefficients);
  const int n = exec.num_threads();
  const int warps = n / kWarpSize > 1 ? n / kWarpSize : 1;   // (an emulated block narrower than a warp: one)
  for_each_chunk_of_block(a, exec, [&](int64_t begin, int64_t end) {
    int64_t blocks_before = 0;
    for_each_row_in_range(a.rows, a.num_rows, begin, end, [&](int64_t i, int64_t lo, int64_t hi) {
      const int64_t blocks = (hi - lo + kQuantBlock - 1) / kQuantBlock;
      const int64_t first_block = blocks_before;
      blocks_before += blocks;
      const TensorRow& row = a.rows[i];
      if ((row.layout >= 0) != kStridedRows) {
        return;   // the other kernel's row
      }
      const RowCoefficients<float> c = all_coefficients[i];
      const QuantizedRowPointers<kStorage> r = quantized_row<kStorage>(row);
      const StridedLayout* layout = kStridedRows ? &a.layouts[row.layout] : nullptr;
      const bool vectorized = !kStridedRows && c.vector_head == 0;
      exec.for_my_threads([&](int t) {
        const int warp = t / kWarpSize;
        const WarpLanes lanes(t % kWarpSize);
        if (warp >= warps || !lanes.runs_warp()) {
          return;
        }
        // This warp's blocks of the part: those q with (first_block + q) mod warps == warp.
        const int64_t skip = (warp - first_block % warps + warps) % warps;
        for (int64_t q = skip; q < blocks; q += warps) {
          update_block<kStorage, amsgrad, kStridedRows>(r, layout, vectorized, c, factors, lo + q * kQuantBlock, hi, lanes);
        }
      });
    });
  });
}

}  // inline namespace NOAM_EXT_KERNELS_COPY
}  // namespace noam_ext::cuda_plan

// The CUDA kernel's work split, written as host/device code so that the same
// driver runs in the kernel (one CUDA block per call) and on the host over an
// emulated grid (csrc/cpu/cuda_emulation.cpp), where CI tests it bit for bit
// against the CPU op without a GPU.
//
// Split: the flat range is cut into chunks of kChunkElements; blocks take
// chunks grid-stride; within a chunk the segments it overlaps are walked in
// order (work_split.h); within a segment's part, each thread takes vectors of
// 16 bytes (kVecBytes), kUnroll of them in flight, and the last partial vector
// element by element. Segment starts are 64-byte aligned in the flat buffers and
// chunk starts are multiples of kChunkElements, so every vector is aligned and
// none straddles two parameters. Offsets are 64-bit throughout.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "../noam_ext/adamw_math.h"
#include "../noam_ext/work_split.h"

namespace noam_ext::cuda_plan {

constexpr int kVecBytes = 16;
constexpr int kUnroll = 4;
constexpr int kThreadsPerBlock = 256;
constexpr int64_t kChunkElements = 16384;
// Groups passed by value with the launch (kernel parameters are limited to 4 KiB).
constexpr int kMaxGroups = 32;

template <typename scalar_t>
struct MathType { using type = float; };
template <>
struct MathType<double> { using type = double; };

struct HyperTable {
  double rows[kMaxGroups][kNumHyperColumns];
};

// Everything one launch needs; passed by value.
template <typename scalar_t>
struct KernelArgs {
  scalar_t* param;
  const scalar_t* grad;
  scalar_t* exp_avg;
  scalar_t* exp_avg_sq;
  scalar_t* max_exp_avg_sq;   // null without amsgrad in any group
  const float* param_steps;   // read here, advanced after the update
  const int64_t* schedule_step;  // [0] completed steps (read here; advanced at the end)
  const Segment* segments;
  const bool* active;         // null: all active
  const float* grad_scale;    // null: no AMP scaling
  const float* found_inf;     // null: never skip
  int64_t num_segments;
  int64_t total;              // length of the flat buffers
  HyperTable hyper;
};

// What thread 0 of a block works out per segment and shares with the others.
template <typename opmath_t>
struct SegmentShared {
  AdamWCoefficients<opmath_t> coefficients;
  bool active;
  bool amsgrad;
  bool maximize;
};

template <typename scalar_t>
struct alignas(kVecBytes) Vec {
  static constexpr int kWidth = kVecBytes / sizeof(scalar_t);
  scalar_t v[kWidth];
};

template <typename scalar_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE Vec<scalar_t> load_vec(const scalar_t* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const Vec<scalar_t>*>(p);   // one 16-byte load
#else
  // The emulation checks what the GPU would fault on: a misaligned vector.
  TORCH_INTERNAL_ASSERT(reinterpret_cast<uintptr_t>(p) % kVecBytes == 0, "misaligned vector load");
  Vec<scalar_t> out;
  std::memcpy(&out, p, sizeof(out));
  return out;
#endif
}

template <typename scalar_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void store_vec(scalar_t* p, const Vec<scalar_t>& value) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<Vec<scalar_t>*>(p) = value;
#else
  TORCH_INTERNAL_ASSERT(reinterpret_cast<uintptr_t>(p) % kVecBytes == 0, "misaligned vector store");
  std::memcpy(p, &value, sizeof(value));
#endif
}

// One element: widen, update with the shared math, round once.
template <bool amsgrad, typename scalar_t, typename opmath_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void update_element(
    scalar_t& p, scalar_t g, scalar_t& m, scalar_t& v, scalar_t* vmax,
    const SegmentShared<opmath_t>& s, const float* grad_scale) {
  opmath_t param = static_cast<opmath_t>(p);
  opmath_t grad = static_cast<opmath_t>(g);
  opmath_t exp_avg = static_cast<opmath_t>(m);
  opmath_t exp_avg_sq = static_cast<opmath_t>(v);
  opmath_t max_sq = amsgrad ? static_cast<opmath_t>(*vmax) : opmath_t(0);
  if (grad_scale != nullptr) {
    grad = grad / static_cast<opmath_t>(*grad_scale);
  }
  adamw_update<amsgrad>(param, grad, exp_avg, exp_avg_sq, &max_sq, s.coefficients, s.maximize);
  p = static_cast<scalar_t>(param);
  m = static_cast<scalar_t>(exp_avg);
  v = static_cast<scalar_t>(exp_avg_sq);
  if constexpr (amsgrad) {
    *vmax = static_cast<scalar_t>(max_sq);
  }
}

// Thread `t` of `num_threads` updates its share of [lo, hi) (lo is vector aligned).
template <bool amsgrad, typename scalar_t, typename opmath_t>
C10_HOST_DEVICE void update_range(
    const KernelArgs<scalar_t>& a, const SegmentShared<opmath_t>& s, int64_t lo, int64_t hi,
    int t, int num_threads) {
  constexpr int W = Vec<scalar_t>::kWidth;
  const int64_t stride = static_cast<int64_t>(num_threads) * W;
  int64_t base = lo + static_cast<int64_t>(t) * W;
  // Full vectors, kUnroll independent ones loaded before any is computed.
  for (; base + (kUnroll - 1) * stride + W <= hi; base += kUnroll * stride) {
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
        update_element<amsgrad>(p[u].v[k], g[u].v[k], m[u].v[k], v[u].v[k], &x[u].v[k], s, a.grad_scale);
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
  for (; base < hi; base += stride) {
    if (base + W <= hi) {
      Vec<scalar_t> p = load_vec(a.param + base), g = load_vec(a.grad + base);
      Vec<scalar_t> m = load_vec(a.exp_avg + base), v = load_vec(a.exp_avg_sq + base), x;
      if constexpr (amsgrad) {
        x = load_vec(a.max_exp_avg_sq + base);
      }
#pragma unroll
      for (int k = 0; k < W; ++k) {
        update_element<amsgrad>(p.v[k], g.v[k], m.v[k], v.v[k], &x.v[k], s, a.grad_scale);
      }
      store_vec(a.param + base, p);
      store_vec(a.exp_avg + base, m);
      store_vec(a.exp_avg_sq + base, v);
      if constexpr (amsgrad) {
        store_vec(a.max_exp_avg_sq + base, x);
      }
    } else {
      for (int64_t i = base; i < hi; ++i) {
        update_element<amsgrad>(a.param[i], a.grad[i], a.exp_avg[i], a.exp_avg_sq[i],
                                amsgrad ? a.max_exp_avg_sq + i : nullptr, s, a.grad_scale);
      }
    }
  }
}

// The segment's coefficients and flags, as thread 0 computes them.
template <typename scalar_t, typename opmath_t>
C10_HOST_DEVICE SegmentShared<opmath_t> segment_shared(const KernelArgs<scalar_t>& a, int64_t i) {
  SegmentShared<opmath_t> s;
  const double* row = a.hyper.rows[a.segments[i].group];
  s.active = a.active == nullptr || a.active[i];
  s.amsgrad = row[kAmsgrad] != 0.0;
  s.maximize = row[kMaximize] != 0.0;
  s.coefficients = coefficients_for<opmath_t>(row, *a.schedule_step, a.param_steps[i]);
  return s;
}

// One block's whole work. Exec abstracts the block: exec.leader() (is this
// thread 0), exec.sync() (__syncthreads), exec.for_my_threads(f) (calls
// f(thread, num_threads) for the calling CUDA thread, or for every emulated one).
template <typename scalar_t, typename Exec>
C10_HOST_DEVICE void run_block(const KernelArgs<scalar_t>& a, Exec& exec,
                               SegmentShared<typename MathType<scalar_t>::type>& shared) {
  using opmath_t = typename MathType<scalar_t>::type;
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) {
    return;  // GradScaler skipped this step: nothing changes
  }
  const int64_t num_chunks = (a.total + kChunkElements - 1) / kChunkElements;
  for (int64_t chunk = exec.block(); chunk < num_chunks; chunk += exec.num_blocks()) {
    const int64_t begin = chunk * kChunkElements;
    const int64_t end = begin + kChunkElements < a.total ? begin + kChunkElements : a.total;
    for_each_segment_in_range(a.segments, a.num_segments, begin, end, [&](int64_t i, int64_t lo, int64_t hi) {
      if (exec.leader()) {
        shared = segment_shared<scalar_t, opmath_t>(a, i);
      }
      exec.sync();
      if (shared.active) {
        const SegmentShared<opmath_t> s = shared;
        exec.for_my_threads([&](int t, int n) {
          if (s.amsgrad) {
            update_range<true>(a, s, lo, hi, t, n);
          } else {
            update_range<false>(a, s, lo, hi, t, n);
          }
        });
      }
      exec.sync();  // shared is rewritten for the next segment
    });
  }
}

// After the update (in the CUDA kernel: by the last block to finish): thread t
// of n advances the steps of active parameters (not on a GradScaler-skipped
// step) and thread 0 the schedule (always, as the CPU op).
C10_HOST_DEVICE inline void advance_steps(float* param_steps, int64_t* schedule_step, const bool* active,
                                          const float* found_inf, int64_t num_segments, int t, int n) {
  const bool skipped = found_inf != nullptr && *found_inf != 0.0f;
  for (int64_t i = t; i < num_segments && !skipped; i += n) {
    if (active == nullptr || active[i]) {
      param_steps[i] += 1.0f;
    }
  }
  if (t == 0) {
    *schedule_step += 1;
  }
}

}  // namespace noam_ext::cuda_plan

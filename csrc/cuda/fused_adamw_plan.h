// The CUDA kernel's work split, written as host/device code so that the same
// driver runs in the kernel (one CUDA block per call) and on the host over an
// emulated grid (csrc/cpu/cuda_emulation.cpp), where CI tests it bit for bit
// against the CPU op without a GPU.
//
// Split: the virtual index space of the call's tensors (work_split.h) is cut
// into chunks of kChunkElements; blocks take chunks grid-stride; within a chunk
// the rows it overlaps are walked in order; within a row's part, each thread
// takes vectors of 16 bytes (kVecBytes), unroll_for<scalar_t>() of them in flight, and the
// last partial vector element by element. Virtual offsets are multiples of
// kRowAlignElements and chunk starts multiples of kChunkElements, so a vector
// never straddles two tensors and, for a row whose pointers are all 16-byte
// aligned (TensorRow::vector_ok), every vector is aligned. A row with any
// misaligned pointer (a view at an odd offset) takes the element path.
// Offsets are 64-bit throughout.
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
// 16-byte vectors in flight per thread: 4 (64 bytes of each tensor), but 2 for the
// 16-bit types, whose vectors hold 8 elements each and would spill registers at 4
// (CI fails the build on any spill).
template <typename scalar_t>
constexpr int unroll_for() {
  return sizeof(scalar_t) == 2 ? 2 : 4;
}
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

// Everything one launch needs; passed by value. The rows live in device memory
// (csrc/cuda/adamw_cuda.cu uploads them), so the launch carries a pointer, not
// the table, and a call may hold any number of tensors.
struct KernelArgs {
  const TensorRow* rows;
  int64_t num_rows;
  int64_t total;                 // length of the virtual index space
  const int64_t* schedule_step;  // [0] completed steps (read here; advanced at the end)
  const float* grad_scale;       // null: no AMP scaling
  const float* found_inf;        // null: never skip
  const double* grad_clip;       // null: no clipping factor
  bool amsgrad;
  bool advance_schedule;
  HyperTable hyper;
};

// What thread 0 of a block works out per segment and shares with the others.
template <typename opmath_t>
struct SegmentShared {
  AdamWCoefficients<opmath_t> coefficients;
  bool maximize;
  bool vector_ok;
};

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
    const SegmentShared<opmath_t>& s, const GradFactors<opmath_t>& f) {
  opmath_t param = static_cast<opmath_t>(p);
  opmath_t grad = static_cast<opmath_t>(g);
  opmath_t exp_avg = static_cast<opmath_t>(m);
  opmath_t exp_avg_sq = static_cast<opmath_t>(v);
  opmath_t max_sq = amsgrad ? static_cast<opmath_t>(*vmax) : opmath_t(0);
  if (f.unscale) {
    grad = grad / f.divisor;
  }
  if (f.clip) {
    grad = grad * f.multiplier;
  }
  adamw_update<amsgrad>(param, grad, exp_avg, exp_avg_sq, &max_sq, s.coefficients, s.maximize);
  p = static_cast<scalar_t>(param);
  m = static_cast<scalar_t>(exp_avg);
  v = static_cast<scalar_t>(exp_avg_sq);
  if constexpr (amsgrad) {
    *vmax = static_cast<scalar_t>(max_sq);
  }
}

// The typed pointers of one row.
template <typename scalar_t>
struct RowPointers {
  scalar_t* param;
  const scalar_t* grad;
  scalar_t* exp_avg;
  scalar_t* exp_avg_sq;
  scalar_t* max_exp_avg_sq;
};

template <typename scalar_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE RowPointers<scalar_t> typed(const TensorRow& r) {
  return {static_cast<scalar_t*>(r.param), static_cast<const scalar_t*>(r.grad), static_cast<scalar_t*>(r.exp_avg),
          static_cast<scalar_t*>(r.exp_avg_sq), static_cast<scalar_t*>(r.max_exp_avg_sq)};
}

// Thread `t` of `num_threads` updates its share of elements [lo, hi) of one
// tensor whose pointers are all 16-byte aligned (lo is a multiple of the width).
template <bool amsgrad, typename scalar_t, typename opmath_t>
C10_HOST_DEVICE void update_range_vectorized(const RowPointers<scalar_t>& a, const SegmentShared<opmath_t>& s,
                                             const GradFactors<opmath_t>& f, int64_t lo, int64_t hi, int t,
                                             int num_threads) {
  constexpr int W = Vec<scalar_t>::kWidth;
  const int64_t stride = static_cast<int64_t>(num_threads) * W;
  int64_t base = lo + static_cast<int64_t>(t) * W;
  constexpr int kUnroll = unroll_for<scalar_t>();
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
        update_element<amsgrad>(p[u].v[k], g[u].v[k], m[u].v[k], v[u].v[k], &x[u].v[k], s, f);
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
        update_element<amsgrad>(p.v[k], g.v[k], m.v[k], v.v[k], &x.v[k], s, f);
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
                                amsgrad ? a.max_exp_avg_sq + i : nullptr, s, f);
      }
    }
  }
}

// The same for a tensor with a misaligned pointer: element by element, thread t
// taking every num_threads-th element (adjacent threads, adjacent elements).
template <bool amsgrad, typename scalar_t, typename opmath_t>
C10_HOST_DEVICE void update_range_elementwise(const RowPointers<scalar_t>& a, const SegmentShared<opmath_t>& s,
                                              const GradFactors<opmath_t>& f, int64_t lo, int64_t hi, int t,
                                              int num_threads) {
  for (int64_t i = lo + t; i < hi; i += num_threads) {
    update_element<amsgrad>(a.param[i], a.grad[i], a.exp_avg[i], a.exp_avg_sq[i],
                            amsgrad ? a.max_exp_avg_sq + i : nullptr, s, f);
  }
}

template <bool amsgrad, typename scalar_t, typename opmath_t>
C10_HOST_DEVICE void update_range(const RowPointers<scalar_t>& a, const SegmentShared<opmath_t>& s,
                                  const GradFactors<opmath_t>& f, int64_t lo, int64_t hi, int t, int num_threads) {
  if (s.vector_ok) {
    update_range_vectorized<amsgrad>(a, s, f, lo, hi, t, num_threads);
  } else {
    update_range_elementwise<amsgrad>(a, s, f, lo, hi, t, num_threads);
  }
}

// The row's coefficients and flags, as thread 0 computes them.
template <typename opmath_t>
C10_HOST_DEVICE SegmentShared<opmath_t> segment_shared(const KernelArgs& a, int64_t i) {
  SegmentShared<opmath_t> s;
  const TensorRow& row = a.rows[i];
  const double* hyper = a.hyper.rows[row.group];
  s.maximize = hyper[kMaximize] != 0.0;
  s.vector_ok = row.vector_ok != 0;
  s.coefficients = coefficients_for<opmath_t>(hyper, *a.schedule_step, *row.step);
  return s;
}

// One block's whole work. Exec abstracts the block: exec.leader() (is this
// thread 0), exec.sync() (__syncthreads), exec.for_my_threads(f) (calls
// f(thread, num_threads) for the calling CUDA thread, or for every emulated one).
template <typename scalar_t, typename Exec>
C10_HOST_DEVICE void run_block(const KernelArgs& a, Exec& exec,
                               SegmentShared<typename MathType<scalar_t>::type>& shared) {
  using opmath_t = typename MathType<scalar_t>::type;
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) {
    return;  // GradScaler skipped this step: nothing changes
  }
  // Read once, held in registers (through the pointers the compiler would reload
  // them after every store, since they might alias the tensors).
  const GradFactors<opmath_t> factors = grad_factors<opmath_t>(a);
  const int64_t num_chunks = (a.total + kChunkElements - 1) / kChunkElements;
  for (int64_t chunk = exec.block(); chunk < num_chunks; chunk += exec.num_blocks()) {
    const int64_t begin = chunk * kChunkElements;
    const int64_t end = begin + kChunkElements < a.total ? begin + kChunkElements : a.total;
    for_each_row_in_range(a.rows, a.num_rows, begin, end, [&](int64_t i, int64_t lo, int64_t hi) {
      if (exec.leader()) {
        shared = segment_shared<opmath_t>(a, i);
      }
      exec.sync();
      const SegmentShared<opmath_t> s = shared;
      const RowPointers<scalar_t> pointers = typed<scalar_t>(a.rows[i]);
      exec.for_my_threads([&](int t, int n) {
        if (a.amsgrad) {
          update_range<true>(pointers, s, factors, lo, hi, t, n);
        } else {
          update_range<false>(pointers, s, factors, lo, hi, t, n);
        }
      });
      exec.sync();  // shared is rewritten for the next row
    });
  }
}

// After the update (in the CUDA kernel: by the last block to finish): thread t
// of n advances the step of every row (not on a GradScaler-skipped step) and
// thread 0 the schedule (always, as the CPU op, when the call advances it).
C10_HOST_DEVICE inline void advance_steps(const KernelArgs& a, int64_t* schedule_step, int t, int n) {
  const bool skipped = a.found_inf != nullptr && *a.found_inf != 0.0f;
  for (int64_t i = t; i < a.num_rows && !skipped; i += n) {
    *a.rows[i].step += 1.0f;
  }
  if (t == 0 && a.advance_schedule) {
    *schedule_step += 1;
  }
}

}  // namespace noam_ext::cuda_plan

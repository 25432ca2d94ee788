// noam_ext::grad_norm on the CPU: the global 2-norm or inf-norm of a list of
// gradients (FusedAdamW.clip_grad_norm_) in one multi-threaded pass over all of
// them, laid end to end in the step's virtual index space (work_split.h), so
// that many small tensors cost one parallel region, not one each.
//
// The result does not depend on the number of threads: the virtual range is cut
// into chunks of a fixed size, each chunk reduces its elements in a fixed order
// into a partial result of its own, and the partials are combined in chunk
// order on one thread.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../noam_ext/work_split.h"
#include "cpu_capability.h"

namespace noam_ext::cpu {
namespace {

// Elements per chunk, the unit of both the work split and the partial results:
// large enough that a chunk streams long runs
// and its fixed costs (a row lookup, one partial) vanish, small enough that a
// 1e6-element call still has 16 chunks to spread over the threads.
constexpr int64_t kChunkElements = 1 << 16;

// Independent accumulators per chunk: element k of a tensor's range goes to
// lane k % kLanes. One accumulator would be one chain of dependent additions
// (a few cycles each), and the build (no fast-math) may not reassociate a
// reduction by itself; 16 lanes are 16 chains, which the compiler also packs
// into vector registers (the same additions in the same order on any ISA).
constexpr int kLanes = 16;

using Lanes = double[kLanes];

// The 2-norm loop prefetches this far ahead of its loads (into L2). Without it,
// with its float-to-double conversions, it keeps too few cache-line misses in
// flight and streams from DRAM at about 70% of torch's sum or dot on this
// project's machine; with it, as fast as they do.
constexpr int64_t kPrefetchBytes = 16384;

// Everything the loops call is forced inline, so that the per-instruction-set
// copies below compile all of it with their own instructions.
#define NOAM_EXT_INLINE inline __attribute__((always_inline))

NOAM_EXT_INLINE double widen(float x) { return x; }
NOAM_EXT_INLINE double widen(double x) { return x; }
NOAM_EXT_INLINE double widen(c10::BFloat16 x) { return static_cast<float>(x); }
NOAM_EXT_INLINE double widen(c10::Half x) { return static_cast<float>(x); }

// max(a, b) where a NaN in either wins (torch's inf-norm of a NaN is NaN).
inline double nan_max(double a, double b) { return (b > a || b != b) ? b : a; }

template <typename T>
NOAM_EXT_INLINE void prefetch_ahead(const T* x) {
  for (size_t b = 0; b < kLanes * sizeof(T); b += 64) {   // every cache line of a step of kLanes
    __builtin_prefetch(reinterpret_cast<const char*>(x) + kPrefetchBytes + b, 0, 1);
  }
}

// Elements [lo, hi) of one tensor into the lanes: element lo + k goes to lane
// k % kLanes. Squares of float32/bfloat16/float16 values widened to double are
// exact; only the additions round.
template <typename T>
NOAM_EXT_INLINE void add_squares(const T* x, int64_t n, double* lanes) {
  Lanes acc;   // a local copy, kept in registers (lanes might alias x as far as the compiler knows)
  for (int j = 0; j < kLanes; ++j) acc[j] = lanes[j];
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    prefetch_ahead(x + i);
    for (int j = 0; j < kLanes; ++j) {
      const double v = widen(x[i + j]);
      acc[j] += v * v;
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    const double v = widen(x[i]);
    acc[j] += v * v;
  }
  for (int j = 0; j < kLanes; ++j) lanes[j] = acc[j];
}

// A signed integer as wide as T.
template <typename T>
using Bits = std::conditional_t<sizeof(T) == 8, int64_t, std::conditional_t<sizeof(T) == 4, int32_t, int16_t>>;

// max |x| on the bits: with the sign bit cleared, IEEE values order as integers,
// and every NaN above inf. So the maximum is exact, any NaN wins, and it is an
// integer max the compiler vectorises (a NaN-propagating float max it does not).
template <typename T>
NOAM_EXT_INLINE void max_abs(const T* x, int64_t n, double* lanes) {
  using I = Bits<T>;
  constexpr I kNoSign = std::numeric_limits<I>::max();
  I acc[kLanes] = {};
  auto take = [&](int j, const T& v) {
    I b;
    std::memcpy(&b, &v, sizeof b);
    b &= kNoSign;
    acc[j] = b > acc[j] ? b : acc[j];
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {   // (no prefetch_ahead: needless here, and it
                                            // stops the compiler vectorising this loop)
    for (int j = 0; j < kLanes; ++j) take(j, x[i + j]);
  }
  for (int j = 0; i < n; ++i, ++j) take(j, x[i]);
  for (int j = 0; j < kLanes; ++j) {
    T v;
    std::memcpy(&v, &acc[j], sizeof v);
    lanes[j] = nan_max(lanes[j], widen(v));
  }
}

template <bool kInf, typename T>
NOAM_EXT_INLINE void reduce_range(const void* data, int64_t lo, int64_t hi, double* lanes) {
  const T* x = static_cast<const T*>(data) + lo;
  if constexpr (kInf) {
    max_abs(x, hi - lo, lanes);
  } else {
    add_squares(x, hi - lo, lanes);
  }
}

// The same loops compiled for the baseline and, on x86-64, for AVX2 and AVX-512;
// a call runs the instruction set the step runs (cpu_capability.h). With target
// attributes here rather than in the step's per-instruction-set files
// (segment_kernel_*.cpp, compiled whole with -mavx2/-mavx512f): those may hold only
// vector code, and these scalar loops call c10's inline Half/BFloat16 conversions,
// whose out-of-line copies the linker shares between files and which must therefore
// stay baseline code (here only the always-inlined loops get the wider instructions). The same
// operations in the same order, so the same result on all of them (no FMA:
// -ffp-contract=off). The baseline's 2-double SSE2 vectors keep up with DRAM but
// reach about half the others' speed on gradients in cache.
using RangeKernel = void (*)(const void* data, int64_t lo, int64_t hi, double* lanes);

template <bool kInf, typename T>
void reduce_range_default(const void* data, int64_t lo, int64_t hi, double* lanes) {
  reduce_range<kInf, T>(data, lo, hi, lanes);
}
#if defined(NOAM_EXT_HAVE_AVX2)
template <bool kInf, typename T>
__attribute__((target("avx2,fma,f16c"))) void reduce_range_avx2(const void* data, int64_t lo, int64_t hi,
                                                                 double* lanes) {
  reduce_range<kInf, T>(data, lo, hi, lanes);
}
#endif
#if defined(NOAM_EXT_HAVE_AVX512)
template <bool kInf, typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))) void reduce_range_avx512(
    const void* data, int64_t lo, int64_t hi, double* lanes) {
  reduce_range<kInf, T>(data, lo, hi, lanes);
}
#endif

template <bool kInf, typename T>
RangeKernel select_kernel() {
  const std::string& isa = active_cpu_capability();
#if defined(NOAM_EXT_HAVE_AVX512)
  if (isa == "avx512") return &reduce_range_avx512<kInf, T>;
#endif
#if defined(NOAM_EXT_HAVE_AVX2)
  if (isa == "avx2") return &reduce_range_avx2<kInf, T>;
#endif
  return &reduce_range_default<kInf, T>;
}

template <bool kInf>
RangeKernel select_kernel(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return select_kernel<kInf, float>();
    case at::kDouble: return select_kernel<kInf, double>();
    case at::kBFloat16: return select_kernel<kInf, c10::BFloat16>();
    default: return select_kernel<kInf, c10::Half>();
  }
}

template <bool kInf>
double reduce_rows(const std::vector<TensorRow>& rows, const std::vector<RangeKernel>& kernels, int64_t total) {
  const int64_t n_chunks = (total + kChunkElements - 1) / kChunkElements;
  std::vector<double> partials(n_chunks);
  const TensorRow* table = rows.data();
  const int64_t n = static_cast<int64_t>(rows.size());
  at::parallel_for(0, n_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      Lanes lanes = {};   // 0 is the identity of both sums of squares and maxima of |g|
      const int64_t end = std::min(total, (c + 1) * kChunkElements);
      for_each_row_in_range(table, n, c * kChunkElements, end, [&](int64_t i, int64_t lo, int64_t hi) {
        kernels[i](table[i].grad, lo, hi, lanes);
      });
      // Lanes pairwise, then (below) chunks in order: a fixed order either way.
      for (int width = kLanes / 2; width > 0; width /= 2) {
        for (int j = 0; j < width; ++j) {
          lanes[j] = kInf ? nan_max(lanes[j], lanes[j + width]) : lanes[j] + lanes[j + width];
        }
      }
      partials[c] = lanes[0];
    }
  });
  double result = 0.0;
  for (const double p : partials) {
    result = kInf ? nan_max(result, p) : result + p;
  }
  return kInf ? result : std::sqrt(result);
}

at::Tensor grad_norm(at::TensorList grads, double norm_type) {
  const bool inf = norm_type == std::numeric_limits<double>::infinity();
  TORCH_CHECK(inf || norm_type == 2.0, "grad_norm: norm_type must be 2.0 or inf, got ", norm_type);
  std::vector<TensorRow> rows(grads.size());
  std::vector<RangeKernel> kernels(grads.size());
  std::vector<at::Tensor> copies;   // keeps the contiguous copies of strided views alive
  int64_t end = 0;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.defined() && g.layout() == at::kStrided, "grad_norm: grads[", i,
                "] must be a dense (strided) tensor", g.defined() && g.is_sparse() ? ", got a sparse one" : "");
    TORCH_CHECK(g.is_cpu(), "grad_norm: grads[", i, "] is on ", g.device(),
                "; this implementation takes CPU tensors only");
    const at::ScalarType dtype = g.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
                "grad_norm: grads[", i, "] must be float32, float64, bfloat16 or float16, got ", dtype);
    // A non-overlapping and dense tensor (contiguous, or e.g. transposed) holds its
    // numel elements in one block from its data pointer on, in some order, and a norm
    // does not care which; anything else is read from a contiguous copy.
    const at::Tensor& dense =
        g.is_non_overlapping_and_dense() ? g : copies.emplace_back(g.contiguous());
    rows[i].grad = dense.const_data_ptr();
    rows[i].numel = dense.numel();
    rows[i].offset = next_row_offset(end);
    end = rows[i].offset + rows[i].numel;
    kernels[i] = inf ? select_kernel<true>(dtype) : select_kernel<false>(dtype);
  }
  const double norm = inf ? reduce_rows<true>(rows, kernels, end) : reduce_rows<false>(rows, kernels, end);
  return at::scalar_tensor(norm, at::TensorOptions().dtype(at::kDouble));
}

}  // namespace

// CompositeExplicitAutograd rather than CPU: the dispatcher then hands this function
// calls with no tensor (an empty list: norm 0) and calls mixing devices, which it
// rejects naming the tensor. Meta and fake tensors go to the fake implementation
// (noam_ext/_ops.py).
TORCH_LIBRARY_IMPL(noam_ext, CompositeExplicitAutograd, m) {
  m.impl("grad_norm", &grad_norm);
}

}  // namespace noam_ext::cpu

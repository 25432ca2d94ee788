// noam_ext::fused_adamw_ on the CPU: one multi-threaded pass over every tensor
// of the call, with the scheduled lr and the bias corrections computed here from the
// step counters.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../noam_ext/op_entry.h"
#include "../noam_ext/work_split.h"
#include "cpu_capability.h"

namespace noam_ext::cpu {
namespace {

// Elements per parallel task: large enough that a thread streams long
// contiguous runs, small enough that two threads share 1e5 elements.
constexpr int64_t kGrainSize = 32768;

// Coefficients of every row, computed once per (group, step) run: in the
// common case all parameters of a group share their step count, so the pow()
// calls happen per group, not per parameter.
void compute_coefficients(const std::vector<TensorRow>& rows, const double* hyper, int64_t schedule_step,
                          std::vector<SegmentCoefficients>& out) {
  out.resize(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    const int32_t g = rows[i].group;
    const float step = *rows[i].step;
    if (i > 0 && rows[i - 1].group == g && *rows[i - 1].step == step) {
      out[i] = out[i - 1];
    } else {
      const double* row = hyper + g * kNumHyperColumns;
      out[i].f32 = coefficients_for<float>(row, schedule_step, step);
      out[i].f64 = coefficients_for<double>(row, schedule_step, step);
    }
  }
}

// Elements of a strided row gathered per tile (work_split.h, StridedLayout): one block of
// 8-bit moments, so that a tile that starts on a block holds whole blocks.
constexpr int64_t kStridedTile = kQuantBlock;

template <size_t kBytes>
void copy_elements(char* to, const char* from, const int64_t* to_offsets, const int64_t* from_offsets,
                   int64_t count) {
  for (int64_t e = 0; e < count; ++e) {
    std::memcpy(to + (to_offsets ? to_offsets[e] : e) * static_cast<int64_t>(kBytes),
                from + (from_offsets ? from_offsets[e] : e) * static_cast<int64_t>(kBytes), kBytes);
  }
}

void copy_elements(size_t bytes, char* to, const char* from, const int64_t* to_offsets, const int64_t* from_offsets,
                   int64_t count) {
  switch (bytes) {
    case 1: return copy_elements<1>(to, from, to_offsets, from_offsets, count);
    case 2: return copy_elements<2>(to, from, to_offsets, from_offsets, count);
    case 4: return copy_elements<4>(to, from, to_offsets, from_offsets, count);
    default: return copy_elements<8>(to, from, to_offsets, from_offsets, count);
  }
}

// Bytes per element of each of a row's tensors (RowTensor order).
struct ElementSizes {
  size_t of[kRowTensors];
};

ElementSizes element_sizes(const StorageTypes& s) {
  const size_t moment = c10::elementSize(s.moment);
  return {{c10::elementSize(s.param), c10::elementSize(s.grad), moment, moment, moment,
           s.master == MasterKind::kNone ? 0 : c10::elementSize(master_dtype(s.master))}};
}

// Elements [lo, hi) of a row whose tensors are not dense and laid out alike: gathered
// tile by tile into contiguous buffers, updated there by the same vectorised loop as
// every other row (so with the same roundings), and the written tensors scattered back.
// Only copies happen here; no arithmetic.
void update_strided(SegmentKernel kernel, const TensorRow& r, const StridedLayout& layout, const ElementSizes& sizes,
                    int64_t lo, int64_t hi, const SegmentCoefficients& c, bool maximize, double grad_divisor,
                    double grad_multiplier, RoundingKeys rounding) {
  alignas(64) char tiles[kRowTensors][kStridedTile * sizeof(double)];
  int64_t offsets[kRowTensors][kStridedTile];
  char* const bases[kRowTensors] = {static_cast<char*>(r.param), static_cast<char*>(const_cast<void*>(r.grad)),
                                    static_cast<char*>(r.exp_avg), static_cast<char*>(r.exp_avg_sq),
                                    static_cast<char*>(r.max_exp_avg_sq), static_cast<char*>(r.master)};
  const uint32_t index_low_base = rounding.index_low_base;
  StridedCursor cursor(layout, lo);
  for (int64_t start = lo; start < hi; start += kStridedTile) {
    const int64_t count = std::min(kStridedTile, hi - start);
    for (int64_t e = 0; e < count; ++e) {
      for (int t = 0; t < kRowTensors; ++t) {
        offsets[t][e] = cursor.offsets[t];
      }
      cursor.advance();
    }
    for (int t = 0; t < kRowTensors; ++t) {
      if (bases[t] != nullptr) {
        copy_elements(sizes.of[t], tiles[t], bases[t], nullptr, offsets[t], count);
      }
    }
    auto tile_of = [&](int t) -> void* { return bases[t] != nullptr ? tiles[t] : nullptr; };
    // The tile's scales (8-bit moments) start at the block of its element 0 (`start` is a
    // block's first element then: quantized_range).
    auto scales_of = [&](int k) { return r.absmax[k] != nullptr ? r.absmax[k] + start / kQuantBlock : nullptr; };
    const FlatPointers tile{tile_of(kParamTensor),    tile_of(kGradTensor),        tile_of(kExpAvgTensor),
                            tile_of(kExpAvgSqTensor), tile_of(kMaxExpAvgSqTensor), tile_of(kMasterTensor),
                            {scales_of(0), scales_of(1), scales_of(2)}};
    // The tile's element 0 is the row's element `start`.
    rounding.index_low_base = index_low_base + static_cast<uint32_t>(start);
    kernel(tile, 0, count, c, maximize, grad_divisor, grad_multiplier, rounding);
    for (int t = 0; t < kRowTensors; ++t) {
      if (t != kGradTensor && bases[t] != nullptr) {
        copy_elements(sizes.of[t], bases[t], tiles[t], offsets[t], nullptr, count);
      }
    }
  }
}

// Calls f(lo, hi, keys) for the parts of a row's range [lo, hi) whose elements' indices
// within their whole parameter share the high 32 bits (the keys of stochastic rounding
// change there); one call with disabled keys without stochastic rounding. (With 8-bit moments
// the element offset is a multiple of a block, op_checks.h: parts end between blocks.)
template <typename F>
void for_each_rounding_part(const TensorRow& r, int64_t lo, int64_t hi, bool stochastic_rounding, F&& f) {
  if (!stochastic_rounding) {
    f(lo, hi, RoundingKeys{});
    return;
  }
  const float step = *r.step + 1.0f;   // the parameter's step count after this step
  while (lo < hi) {
    const uint64_t first = static_cast<uint64_t>(r.element_offset + lo);
    const auto high = static_cast<uint32_t>(first >> 32);
    const int64_t boundary = static_cast<int64_t>(((first >> 32) + 1) << 32) - r.element_offset;
    const int64_t part_end = std::min<int64_t>(hi, boundary);
    RoundingKeys keys;
    keys.enabled = true;
    keys.param_and_exp_avg = rounding_key(r.rng_stream, step, kParamAndExpAvg, high);
    keys.exp_avg_sq_and_max = rounding_key(r.rng_stream, step, kExpAvgSqAndMax, high);
    keys.index_low_base = static_cast<uint32_t>(static_cast<uint64_t>(r.element_offset));
    f(lo, part_end, keys);
    lo = part_end;
  }
}

// 8-bit moments are encoded a block at a time: of a row's range [lo, hi) (split anywhere by
// the threads' shares), a thread takes the blocks that start in it, so that every block is
// updated whole by one thread. Returns false when no block starts in the range.
inline bool quantized_range(int64_t numel, int64_t& lo, int64_t& hi) {
  auto block_start_at_or_after = [](int64_t k) { return (k + kQuantBlock - 1) / kQuantBlock * kQuantBlock; };
  lo = block_start_at_or_after(lo);
  hi = hi == numel ? numel : std::min(numel, block_start_at_or_after(hi));
  return lo < hi;
}

}  // namespace

bool op_is_parallel() {
#if defined(INTRA_OP_PARALLEL)
  return true;
#else
  return false;
#endif
}

void run_rows(const RowsCall& call) {
  TORCH_CHECK(call.hyper.is_cpu(), "fused_adamw_: the CPU op reads hyper on the CPU, got it on ",
              call.hyper.device());
  int64_t* schedule = call.schedule_step.data_ptr<int64_t>();
  // GradScaler found an inf/NaN gradient: the step is skipped as in PyTorch's
  // fused AdamW (no parameter, moment or step changes). The schedule still
  // advances, as a TransformerLRScheduler stepped after every optimizer.step()
  // does, so the host's view of the lr stays right without a sync.
  if (call.found_inf && call.found_inf->item<float>() != 0.0f) {
    *schedule += call.advance_schedule ? 1 : 0;
    return;
  }
  const double grad_divisor = call.grad_scale ? static_cast<double>(call.grad_scale->item<float>()) : 1.0;
  const double grad_multiplier = call.grad_clip ? call.grad_clip->item<double>() : 1.0;
  const double* hyper = call.hyper.const_data_ptr<double>();

  thread_local std::vector<SegmentCoefficients> coefficients;
  compute_coefficients(call.rows, hyper, *schedule, coefficients);

  const SegmentKernel kernel = select_segment_kernel(call.storage, call.amsgrad);
  TORCH_CHECK(kernel != nullptr, "fused_adamw_: no CPU kernel for ", describe(call.storage));
  const SegmentCoefficients* coeffs = coefficients.data();
  const TensorRow* table = call.rows.data();
  const int64_t n = static_cast<int64_t>(call.rows.size());
  const ElementSizes sizes = element_sizes(call.storage);
  const bool quantized = call.storage.quantized();

  // Split the virtual range, not the tensor list, so that one huge tensor and
  // many tiny ones spread over the threads alike.
  at::parallel_for(0, call.total, kGrainSize, [&](int64_t begin, int64_t end) {
    for_each_row_in_range(table, n, begin, end, [&](int64_t i, int64_t lo, int64_t hi) {
      const TensorRow& r = table[i];
      if (quantized && !quantized_range(r.numel, lo, hi)) {
        return;
      }
      const bool maximize = hyper[r.group * kNumHyperColumns + kMaximize] != 0.0;
      const FlatPointers pointers{r.param,  r.grad,   r.exp_avg, r.exp_avg_sq, r.max_exp_avg_sq,
                                  r.master, {r.absmax[0], r.absmax[1], r.absmax[2]}};
      for_each_rounding_part(r, lo, hi, call.stochastic_rounding, [&](int64_t a, int64_t b, const RoundingKeys& keys) {
        if (r.layout >= 0) {
          update_strided(kernel, r, call.layouts[r.layout], sizes, a, b, coeffs[i], maximize, grad_divisor,
                         grad_multiplier, keys);
        } else {
          kernel(pointers, a, b, coeffs[i], maximize, grad_divisor, grad_multiplier, keys);
        }
      });
    });
  });

  for (const TensorRow& r : call.rows) {
    *r.step += 1.0f;
  }
  *schedule += call.advance_schedule ? 1 : 0;
}

TORCH_LIBRARY_IMPL(noam_ext, CPU, m) {
  m.impl("fused_adamw_", &fused_adamw_op<&run_rows>);
}

}  // namespace noam_ext::cpu

// How the tensors of one op call are split into work. Shared by the CPU op
// (which splits over threads), the CUDA kernel (which splits over blocks) and
// the kernel's host emulation, so that all of them walk tensors the same way.
//
// The tensors of a call are laid end to end in a *virtual* index space: tensor
// i owns [offset, offset + numel), with offsets rounded up to a multiple of
// kRowAlignElements so that a chunk boundary never falls inside a 16-byte
// vector of a tensor whose memory is 16-byte aligned. Nothing is allocated for
// this space: each row carries the tensor's own pointers, and an element at
// virtual index k of row i lives at pointer + (k - offset).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <type_traits>

namespace noam_ext {

// Virtual offsets are multiples of this many elements: 16 bytes of the
// smallest element type we store (2-byte bfloat16/half) is 8 elements, and any
// multiple of 16 bytes' worth of elements of a wider type is a multiple of 8 too.
constexpr int64_t kRowAlignElements = 16;

// One tensor of an op call: where its elements live and what they need.
struct TensorRow {
  int64_t offset;          // start in the virtual index space
  int64_t numel;
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;    // null without amsgrad
  void* master;            // float32 master or int16 remainder (storage.h), or null
  float* absmax[3];        // 8-bit moments (storage.h, quantized()): the float32 scales of exp_avg,
                           // exp_avg_sq and max_exp_avg_sq (null without amsgrad), one per block
                           // of kQuantBlock elements of the row; all null otherwise
  float* step;             // torch's state["step"] (float32, one element, on the device)
  uint64_t rng_stream;     // stochastic rounding: the parameter's stream (adamw_math.h, rounding_key)
  int64_t element_offset;  // stochastic rounding: the index of element 0 within the whole parameter
  int32_t group;           // row of the hyperparameter table
  int32_t layout = -1;     // -1: the tensors are dense and share the parameter's strides, so
                           // element k of each lives at pointer + k; otherwise the index of
                           // the row's StridedLayout in the call's layout table
  int32_t reserved[2] = {0, 0};   // explicit padding, always zero: the CUDA table cache
                                  // compares rows with memcmp, which reads padding too
};
static_assert(std::has_unique_object_representations_v<TensorRow>,
              "TensorRow must have no implicit padding (its bytes are compared with memcmp)");

// The strided layout of a row whose tensors are not laid out alike and densely: a
// parameter that is a view with gaps (torch.randn(10, 5, 2)[..., 0]), or a gradient or
// state tensor with other strides than its parameter. Element k is the k-th of the
// layout's dimensions in row-major order (the parameter's memory order when it is dense,
// its shape's order when it has gaps: make_strided_layout); in tensor t it lives at
// pointer_t + sum_d index_d(k) * strides[t][d] (elements). Dimensions that are laid out
// alike in every tensor are merged and dimensions of size 1 dropped first
// (make_strided_layout in op_checks.h), so kMaxStridedDims is ample.
constexpr int kMaxStridedDims = 8;
constexpr int kRowTensors = 6;   // param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master
enum RowTensor : int {
  kParamTensor = 0, kGradTensor, kExpAvgTensor, kExpAvgSqTensor, kMaxExpAvgSqTensor, kMasterTensor
};

struct StridedLayout {
  int64_t ndim;
  int64_t sizes[kMaxStridedDims];
  int64_t strides[kRowTensors][kMaxStridedDims];
};

// The element offsets of element k in each of the row's tensors.
C10_HOST_DEVICE inline void strided_offsets(const StridedLayout& layout, int64_t k, int64_t (&offsets)[kRowTensors]) {
  for (int t = 0; t < kRowTensors; ++t) {
    offsets[t] = 0;
  }
  for (int64_t d = layout.ndim - 1; d >= 0; --d) {
    const int64_t size = layout.sizes[d];
    const int64_t index = k % size;
    k /= size;
    for (int t = 0; t < kRowTensors; ++t) {
      offsets[t] += index * layout.strides[t][d];
    }
  }
}

// Walks consecutive elements of a strided row, keeping their offsets without a
// division per element (the CPU's strided loop).
struct StridedCursor {
  const StridedLayout* layout;
  int64_t index[kMaxStridedDims];
  int64_t offsets[kRowTensors];

  C10_HOST_DEVICE StridedCursor(const StridedLayout& l, int64_t k) : layout(&l) {
    strided_offsets(l, k, offsets);
    for (int64_t d = l.ndim - 1; d >= 0; --d) {
      index[d] = k % l.sizes[d];
      k /= l.sizes[d];
    }
  }

  C10_HOST_DEVICE void advance() {
    for (int64_t d = layout->ndim - 1; d >= 0; --d) {
      for (int t = 0; t < kRowTensors; ++t) {
        offsets[t] += layout->strides[t][d];
      }
      if (++index[d] < layout->sizes[d]) {
        return;
      }
      for (int t = 0; t < kRowTensors; ++t) {
        offsets[t] -= index[d] * layout->strides[t][d];
      }
      index[d] = 0;
    }
  }
};

// Where the next row starts after a row ending at virtual index `end`: at a multiple of
// `alignment` elements, kRowAlignElements or (8-bit moments: op_checks.h, row_alignment) a
// multiple of it.
C10_HOST_DEVICE inline int64_t next_row_offset(int64_t end, int64_t alignment = kRowAlignElements) {
  return (end + alignment - 1) / alignment * alignment;
}

// Index of the last row starting at or before `pos` (0 if none): where a walk
// over the range starting at `pos` begins. Rows are sorted by offset.
C10_HOST_DEVICE inline int64_t first_row_at(const TensorRow* rows, int64_t n, int64_t pos) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (rows[mid].offset <= pos) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo == 0 ? 0 : lo - 1;
}

// Calls f(row_index, lo, hi) for every non-empty intersection of the virtual
// range [begin, end) with a row, in order; lo and hi are indices *within* the
// tensor (0 <= lo < hi <= numel). Padding between rows is skipped.
template <typename F>
C10_HOST_DEVICE inline void for_each_row_in_range(const TensorRow* rows, int64_t n, int64_t begin, int64_t end,
                                                  F&& f) {
  for (int64_t i = first_row_at(rows, n, begin); i < n && rows[i].offset < end; ++i) {
    const int64_t row_end = rows[i].offset + rows[i].numel;
    const int64_t lo = begin > rows[i].offset ? begin : rows[i].offset;
    const int64_t hi = end < row_end ? end : row_end;
    if (lo < hi) {
      f(i, lo - rows[i].offset, hi - rows[i].offset);
    }
  }
}

}  // namespace noam_ext

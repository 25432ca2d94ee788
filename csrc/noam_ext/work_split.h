// How a range of the flat buffers maps onto parameters ("segments"). Shared by
// the CPU op (which splits the range over threads) and the CUDA kernel (which
// splits it over blocks), so that both walk segments the same way.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace noam_ext {

// One row of the op's segments table: a parameter's slot in the flat buffers.
struct Segment {
  int64_t offset;
  int64_t numel;
  int64_t group;
};

// Index of the last segment starting at or before `pos` (0 if none): where a
// walk over the range starting at `pos` begins. Segments are sorted by offset.
C10_HOST_DEVICE inline int64_t first_segment_at(const Segment* segments, int64_t n, int64_t pos) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (segments[mid].offset <= pos) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo == 0 ? 0 : lo - 1;
}

// Calls f(segment_index, lo, hi) for every non-empty intersection of
// [begin, end) with a segment, in order. Padding between segments is skipped.
template <typename F>
C10_HOST_DEVICE inline void for_each_segment_in_range(
    const Segment* segments, int64_t n, int64_t begin, int64_t end, F&& f) {
  for (int64_t i = first_segment_at(segments, n, begin); i < n && segments[i].offset < end; ++i) {
    const int64_t seg_end = segments[i].offset + segments[i].numel;
    const int64_t lo = begin > segments[i].offset ? begin : segments[i].offset;
    const int64_t hi = end < seg_end ? end : seg_end;
    if (lo < hi) {
      f(i, lo, hi);
    }
  }
}

}  // namespace noam_ext

// Block-wise 8-bit moments (FusedAdamW's moment_dtype="8bit"): the maps and the exact
// nearest-code encoder, defined by arithmetic so that no step reads a table.
//
// The maps are the dynamic maps of Dettmers et al., "8-bit Optimizers via Block-wise
// Quantization" (the maps bitsandbytes and torchao build with create_dynamic_map): in decade d
// (d = 0..6, scale 10^(d-6)) there are n = 2^L values, the midpoints of n equal steps over
// [0.1, 1) times the scale, L = d for the signed map (exp_avg: those values, their negatives,
// 0 and 1.0: 256 codes sorted, no -1.0) and L = d + 1 for the unsigned map (exp_avg_sq and
// max_exp_avg_sq: 0, those values and 1.0). Here value j of decade d is, in float32,
//     fma(2j + 1, 0.45 * 2^-L, 0.1) * kDecadeScales[d]
// which is within 2 ulps (1.8e-7 relative) of bitsandbytes' float32 table (which comes from
// torch.linspace), and equal to it in 176 (signed) and 163 (unsigned) of the 256 values.
//
// A moment x of a block whose float32 scale is absmax is stored as the code of the map value
// nearest to y = x * r, r = 1 / absmax (one IEEE division per block; r = 0 for absmax 0), ties
// to the lower code; it decodes to value(code) * absmax. One exception, for exp_avg_sq and
// max_exp_avg_sq: a positive moment never gets the zero code (it gets code 1, the smallest
// positive value), so that a tiny second moment beside a large one in its block cannot become 0
// and blow up its element's update m / (sqrt(v) + eps). docs/eight_bit_state.md says why.
//
// The nearest code, exactly, without a search: the decade from 6 comparisons with the decades'
// first values, an estimate j0 of the position within it (off by less than 0.5 of a step, so
// that the nearest value is j0's or the next one's), then the exact choice between those two:
// y is above their midpoint (lo + hi) / 2 exactly when 2y - s > e, where s = fl(lo + hi) and
// e = lo - (s - hi) is its rounding error (Fast2Sum; 2y - s is exact where it matters).
//
// This header holds the constants every implementation shares and the out-of-line host
// reference (quantization.cpp); the functions themselves are written once, as host/device
// code, in quantization_math.h (which the reference and the CUDA kernels call); the CPU
// loop's vector form is in csrc/cpu/segment_kernel_impl.h.
#pragma once

#include <cstdint>

namespace noam_ext {

// Elements per block (one float32 absmax each), bitsandbytes' block for two-state optimizers.
constexpr int64_t kQuantBlock = 256;
constexpr int kSignedZeroCode = 127;
constexpr int kUnsignedZeroCode = 0;
constexpr int kSignedTopRank = 127;     // rank of 1.0 among the signed map's positive values
constexpr int kUnsignedTopRank = 254;

// 10^(d - 6) for decade d; [7] pads the table to 8 lanes (a permute's) and scales nothing.
constexpr float kDecadeScales[8] = {1e-6f, 1e-5f, 1e-4f, 1e-3f, 1e-2f, 1e-1f, 1.0f, 10.0f};
// Their reciprocals, for the position estimate only (any rounding does).
constexpr float kDecadeInverses[8] = {1e6f, 1e5f, 1e4f, 1e3f, 1e2f, 1e1f, 1.0f, 0.1f};
constexpr float kMeanOffset = 0.1f;     // the first step starts at 0.1 of the decade's scale
constexpr float kMeanHalfStep = 0.45f;  // half the [0.1, 1) span: value j is 0.1 + (2j + 1) * 0.45 / n
constexpr float kStepsPerUnit = 1.0f / 0.9f;

// The value of code `code` per unit of scale, and the code of moment x of a block with
// reciprocal r (host reference: quantization.cpp; the kernels compute the same bits).
float map_value(bool is_signed, int32_t code);
int32_t encode_moment(bool is_signed, float x, float r);
// The first value of decade d (0..6) per unit of scale, and for d = 7 the value after decade 6's
// last: 1.0. (The encoder's decade comparisons, and its upper neighbour across a decade's end.)
float decade_first_value(bool is_signed, int32_t d);

// How a block's moments are scaled before encoding: y = (x * prescale) * reciprocal, where
// reciprocal = 1 / (absmax * prescale), 0 for an empty (all-zero) block. prescale is 1, or 2^64
// for a block whose absmax is subnormal (1 / absmax would overflow to inf): a power of two, so
// the scaled moments are exact. A NaN absmax gives NaN (its block decodes to NaN: a NaN moment
// stays NaN, as in torch, here for its whole block); an infinite one gives 0 (the block's finite
// moments then decode to NaN: 0 * inf).
struct BlockScale {
  float prescale;
  float reciprocal;
};
// (Out of line, like the rest of this header's functions: one copy, with the baseline flags, for
// every translation unit, whatever instruction set it is compiled for.)
BlockScale block_scale(float absmax);

}  // namespace noam_ext

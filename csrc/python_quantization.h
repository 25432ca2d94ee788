// The 8-bit moments' maps and encoder for Python (checkpoint conversions to and from other
// moment forms, tests): the op's own tables and encoder (noam_ext/quantization.h), so that
// Python does not write them a second time. Included by python_module.cpp only.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "noam_ext/quantization.h"

namespace noam_ext::python {

// The 256 values of a map (what code k decodes to, per unit of scale), float32.
inline at::Tensor quantization_map(bool is_signed) {
  at::Tensor out = at::empty({256}, at::kFloat);
  for (int32_t code = 0; code < 256; ++code) {
    out.mutable_data_ptr<float>()[code] = map_value(is_signed, code);
  }
  return out;
}

// (codes, scales) of a 1-D contiguous float32 CPU tensor as the step stores it: blocks of
// kQuantBlock elements, each scale the block's largest magnitude (NaN if it holds a NaN),
// codes by quantization.h's encoder. `is_signed`: exp_avg's map; else exp_avg_sq's.
inline std::tuple<at::Tensor, at::Tensor> quantize_blocks(const at::Tensor& values, bool is_signed) {
  TORCH_CHECK(values.is_cpu() && values.scalar_type() == at::kFloat && values.dim() == 1 && values.is_contiguous(),
              "quantize_blocks: values must be a 1-D contiguous float32 CPU tensor");
  const int64_t n = values.numel();
  at::Tensor codes = at::empty({n}, values.options().dtype(at::kByte));
  at::Tensor scales = at::empty({quantized_blocks(n)}, values.options());
  const float* x = values.const_data_ptr<float>();
  uint8_t* out = codes.mutable_data_ptr<uint8_t>();
  float* peak_out = scales.mutable_data_ptr<float>();
  for (int64_t start = 0; start < n; start += kQuantBlock) {
    const int64_t end = std::min(n, start + kQuantBlock);
    float peak = 0.0f;
    for (int64_t i = start; i < end; ++i) {
      const float a = std::abs(x[i]);
      peak = (a != a || a > peak) ? a : peak;
    }
    const BlockScale scale = block_scale(peak);
    for (int64_t i = start; i < end; ++i) {
      out[i] = static_cast<uint8_t>(encode_moment(is_signed, x[i] * scale.prescale, scale.reciprocal));
    }
    peak_out[start / kQuantBlock] = peak;
  }
  return {codes, scales};
}

// The float32 values of 1-D codes and their blocks' scales (map value times scale).
inline at::Tensor dequantize_blocks(const at::Tensor& codes, const at::Tensor& scales, bool is_signed) {
  TORCH_CHECK(codes.is_cpu() && codes.scalar_type() == at::kByte && codes.dim() == 1 && codes.is_contiguous(),
              "dequantize_blocks: codes must be a 1-D contiguous uint8 CPU tensor");
  TORCH_CHECK(scales.is_cpu() && scales.scalar_type() == at::kFloat && scales.dim() == 1 && scales.is_contiguous() &&
                  scales.numel() == quantized_blocks(codes.numel()),
              "dequantize_blocks: scales must be a 1-D contiguous float32 CPU tensor of ",
              quantized_blocks(codes.numel()), " elements (one per ", kQuantBlock, " codes)");
  float values[256];
  for (int32_t code = 0; code < 256; ++code) {
    values[code] = map_value(is_signed, code);
  }
  at::Tensor out = at::empty({codes.numel()}, scales.options());
  const uint8_t* c = codes.const_data_ptr<uint8_t>();
  const float* s = scales.const_data_ptr<float>();
  float* to = out.mutable_data_ptr<float>();
  for (int64_t i = 0; i < codes.numel(); ++i) {
    to[i] = values[c[i]] * s[i / kQuantBlock];
  }
  return out;
}

}  // namespace noam_ext::python

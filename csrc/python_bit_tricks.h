// The bit tricks of the op that Python needs (checkpoint conversion between master
// forms, stochastic rounding's streams for the compiled step and for shards), exported
// from the C++ that the op runs (adamw_math.h, rounding_streams.h), so that Python
// does not write them a second time. Included by python_module.cpp only.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

#include "noam_ext/adamw_math.h"
#include "noam_ext/rounding_streams.h"

namespace noam_ext::python {

// Elementwise over CPU tensors of one shape: `out` (made like `like`, so with its
// memory format) from the contiguous inputs, written through a contiguous buffer.
template <typename Out, typename Fn>
at::Tensor elementwise_on_cpu(const at::Tensor& like, at::ScalarType out_dtype, Fn&& fn) {
  at::Tensor out = at::empty_like(like, like.options().dtype(out_dtype));
  at::Tensor flat = out.is_contiguous() ? out : at::empty(like.sizes(), like.options().dtype(out_dtype));
  Out* to = flat.mutable_data_ptr<Out>();
  for (int64_t i = 0; i < flat.numel(); ++i) {
    to[i] = fn(i);
  }
  if (!flat.is_same(out)) {
    out.copy_(flat);
  }
  return out;
}

// The int16 remainders of float32 masters (split_master; a NaN master's is 0).
inline at::Tensor remainders_of_masters(const at::Tensor& master) {
  TORCH_CHECK(master.is_cpu() && master.scalar_type() == at::kFloat && master.layout() == at::kStrided,
              "remainders_of_masters: masters must be a float32 CPU tensor, got ", master.scalar_type(), " on ",
              master.device());
  const at::Tensor m = master.contiguous();
  const float* from = m.const_data_ptr<float>();
  return elementwise_on_cpu<int16_t>(master, at::kShort, [&](int64_t i) { return split_master(from[i]).remainder; });
}

// The float32 masters that bfloat16 parameters and their int16 remainders make (join_master).
inline at::Tensor masters_of_remainders(const at::Tensor& param, const at::Tensor& remainder) {
  TORCH_CHECK(param.is_cpu() && remainder.is_cpu() && param.scalar_type() == at::kBFloat16 &&
                  remainder.scalar_type() == at::kShort && param.sizes() == remainder.sizes(),
              "masters_of_remainders: a bfloat16 and an int16 CPU tensor of one shape are needed, got ",
              param.scalar_type(), " ", param.sizes(), " and ", remainder.scalar_type(), " ", remainder.sizes());
  const at::Tensor p = param.contiguous();
  const at::Tensor r = remainder.contiguous();
  const c10::BFloat16* bits = p.const_data_ptr<c10::BFloat16>();
  const int16_t* rest = r.const_data_ptr<int16_t>();
  return elementwise_on_cpu<float>(param, at::kFloat, [&](int64_t i) { return join_master(bits[i].x, rest[i]); });
}

// A stream as the op's int64 arguments carry it (the same 64 bits).
inline int64_t rounding_stream_argument(uint64_t seed, int64_t group, int64_t index, uint64_t salt) {
  return static_cast<int64_t>(param_rounding_stream(seed, group, index, salt));
}

}  // namespace noam_ext::python

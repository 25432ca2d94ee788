// Stochastic rounding's per-parameter streams (adamw_math.h, rounding_key): the group's
// seed and the parameter's place in param_groups, the same on every rank of a sharded
// run, and for a shard whose elements are not a run of the whole parameter's, a salt of
// its own. FusedAdamW's step computes them here; the compiled step and the Python side
// of sharding ask noam_ext._C (python_module.cpp), so they exist once.
#pragma once

#include <cstdint>
#include <vector>

#include "adamw_math.h"

namespace noam_ext {

// The stream of parameter j of param group g; salt 0 but for such a shard.
inline uint64_t param_rounding_stream(uint64_t seed, int64_t g, int64_t j, uint64_t salt) {
  const uint64_t stream = mix64(seed ^ mix64((static_cast<uint64_t>(g) << 32) | static_cast<uint64_t>(j)));
  return salt != 0 ? mix64(stream ^ salt) : stream;
}

// The salt of a shard from its global offsets (never 0: 0 means "no salt").
inline uint64_t shard_salt(const std::vector<int64_t>& global_offsets) {
  uint64_t salt = 0;
  for (const int64_t offset : global_offsets) {
    salt = mix64(salt ^ static_cast<uint64_t>(offset));
  }
  return salt | 1u;
}

}  // namespace noam_ext

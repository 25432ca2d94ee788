// What one op call's tensors are stored in: the parameter's dtype, the gradient's,
// the moments', and whether a float32 master of each parameter is kept (as a
// float32 tensor, or as the 16-bit remainder that rebuilds it exactly from a
// bfloat16 parameter). The math always runs in float32 (float64 for float64).
//
// Every implementation supports the same list of combinations (kSupportedStorage):
// each is a compiled instantiation of the CPU loops and the CUDA kernel, so the
// list is kept to what training runs use. A call outside it is refused with the
// list. See docs/adamw.md, "Fewer bytes per parameter".
//
// Moments of dtype uint8 (kQuantized) are 8-bit codes with a float32 scale per block of
// kQuantBlock elements (FusedAdamW's moment_dtype="8bit": quantization.h);
// the op takes the scales in its moment_absmax argument.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "quantization.h"

namespace noam_ext {

enum class MasterKind : int32_t {
  kNone = 0,        // the parameter is its own master
  kFloat32 = 1,     // a float32 master; the parameter is the master rounded
  kRemainder = 2,   // an int16 remainder: (bfloat16 parameter, remainder) is the float32 master, exactly
};

// The optimizer.state key that holds each kind's master (none for kNone), read by
// FusedAdamW's step (step/torch_objects.h) and exported to Python (_C.table_layout()).
constexpr const char* kMasterStateKeys[] = {"", "master_param", "master_remainder"};

struct StorageTypes {
  c10::ScalarType param;
  c10::ScalarType grad;
  c10::ScalarType moment;   // exp_avg, exp_avg_sq and max_exp_avg_sq
  MasterKind master;

  constexpr bool operator==(const StorageTypes& o) const {
    return param == o.param && grad == o.grad && moment == o.moment && master == o.master;
  }
  // torch's own storage: every tensor in the parameter's dtype, no master.
  constexpr bool is_plain() const { return grad == param && moment == param && master == MasterKind::kNone; }
  // Whether the moments are block-wise 8-bit codes (quantization.h).
  constexpr bool quantized() const { return moment == c10::ScalarType::Byte; }
  // Whether any value the step writes is stored in bfloat16 (what stochastic rounding rounds).
  constexpr bool stores_bfloat16() const {
    return (param == c10::ScalarType::BFloat16 && master == MasterKind::kNone) ||
           moment == c10::ScalarType::BFloat16;
  }
};

constexpr auto kF64 = c10::ScalarType::Double;
constexpr auto kF32 = c10::ScalarType::Float;
constexpr auto kBF16 = c10::ScalarType::BFloat16;
constexpr auto kF16 = c10::ScalarType::Half;
constexpr auto kQuantized = c10::ScalarType::Byte;   // 8-bit moment codes

// The supported combinations. The first four are torch's own (every tensor in the
// parameter's dtype); the rest are the low-byte options of FusedAdamW.
constexpr StorageTypes kSupportedStorage[] = {
    {kF64, kF64, kF64, MasterKind::kNone},
    {kF32, kF32, kF32, MasterKind::kNone},
    {kBF16, kBF16, kBF16, MasterKind::kNone},
    {kF16, kF16, kF16, MasterKind::kNone},
    // float32 parameters: bfloat16 gradients, bfloat16 moments, or both
    {kF32, kBF16, kF32, MasterKind::kNone},
    {kF32, kF32, kBF16, MasterKind::kNone},
    {kF32, kBF16, kBF16, MasterKind::kNone},
    // bfloat16 parameters with a float32 master, or its remainder; float32 or bfloat16 moments
    {kBF16, kBF16, kF32, MasterKind::kFloat32},
    {kBF16, kBF16, kBF16, MasterKind::kFloat32},
    {kBF16, kBF16, kF32, MasterKind::kRemainder},
    {kBF16, kBF16, kBF16, MasterKind::kRemainder},
    // float16 parameters with a float32 master
    {kF16, kF16, kF32, MasterKind::kFloat32},
    // 8-bit moments (CPU only so far: the CUDA op refuses them, csrc/cuda/storage_units.cuh):
    // float32 parameters (float32 or bfloat16 gradients), bfloat16 parameters (their own
    // master, with stochastic rounding, or with a float32 master or its remainder)
    {kF32, kF32, kQuantized, MasterKind::kNone},
    {kF32, kBF16, kQuantized, MasterKind::kNone},
    {kBF16, kBF16, kQuantized, MasterKind::kNone},
    {kBF16, kBF16, kQuantized, MasterKind::kFloat32},
    {kBF16, kBF16, kQuantized, MasterKind::kRemainder},
};

// The state keys of 8-bit moments (FusedAdamW's moment_dtype="8bit"), per moment: its codes
// (uint8, the parameter's shape) and its scales (float32, one per block), in the order
// exp_avg, exp_avg_sq, max_exp_avg_sq. Read by FusedAdamW's step (step/torch_objects.h) and
// exported to Python (_C.table_layout()["quantized_state"]).
constexpr const char* kQuantizedStateKeys[3][2] = {{"exp_avg_codes", "exp_avg_absmax"},
                                                   {"exp_avg_sq_codes", "exp_avg_sq_absmax"},
                                                   {"max_exp_avg_sq_codes", "max_exp_avg_sq_absmax"}};
// Which map each moment's codes index (quantization.h): the signed one for exp_avg, the
// unsigned one for the second moments.
constexpr bool kQuantizedSigned[3] = {true, false, false};

// The number of blocks (and so of scales) of a moment of `numel` elements.
constexpr int64_t quantized_blocks(int64_t numel) { return (numel + kQuantBlock - 1) / kQuantBlock; }

constexpr bool is_supported_storage(const StorageTypes& s) {
  for (const StorageTypes& t : kSupportedStorage) {
    if (t == s) {
      return true;
    }
  }
  return false;
}

// Names for error messages, defined once in storage.cpp: out of line, so that the .cu
// (nvcc) and the C++ objects do not each compile a copy for the linker to choose from
// (scripts/audit_symbols.py).
const char* master_kind_name(MasterKind k);
std::string describe(const StorageTypes& s);
// The list, one "\n  " line per combination.
std::string supported_storage_list();
// The error for a storage the list lacks; and the index of one it has (or that error).
[[noreturn]] void refuse_storage(const StorageTypes& s);
size_t storage_index(const StorageTypes& s);
// The names Python gives storages (noam_ext._C.supported_storage()): dtypes "float64",
// "float32", "bfloat16", "float16", and "8bit" for quantized moments; masters "none", "float32", "remainder".
const char* storage_dtype_name(c10::ScalarType t);
const char* storage_master_name(MasterKind k);
StorageTypes storage_named(const std::string& param, const std::string& grad, const std::string& moment,
                           const std::string& master);

// The C++ type that stores a dtype of the list.
template <c10::ScalarType S>
using storage_t = std::conditional_t<
    S == c10::ScalarType::Double, double,
    std::conditional_t<
        S == c10::ScalarType::Float, float,
        std::conditional_t<S == c10::ScalarType::BFloat16, c10::BFloat16,
                           std::conditional_t<S == c10::ScalarType::Byte, uint8_t, c10::Half>>>>;

// The dtype of a master tensor of this kind.
inline c10::ScalarType master_dtype(MasterKind k) {
  return k == MasterKind::kRemainder ? c10::ScalarType::Short : c10::ScalarType::Float;
}

// Calls f(std::integral_constant<int, i>{}) for the index i of `s` in kSupportedStorage
// (callers instantiate their loop or kernel for kSupportedStorage[i]).
template <int I = 0, typename F>
void dispatch_storage(const StorageTypes& s, F&& f) {
  constexpr int n = static_cast<int>(sizeof(kSupportedStorage) / sizeof(kSupportedStorage[0]));
  if constexpr (I < n) {
    if (kSupportedStorage[I] == s) {
      return f(std::integral_constant<int, I>{});
    }
    return dispatch_storage<I + 1>(s, std::forward<F>(f));
  } else {
    refuse_storage(s);
  }
}

}  // namespace noam_ext

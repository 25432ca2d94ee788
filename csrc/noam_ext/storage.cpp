// storage.h's names for error messages (out of line: see there).
#include "storage.h"

#include <iterator>

namespace noam_ext {

const char* master_kind_name(MasterKind k) {
  switch (k) {
    case MasterKind::kFloat32: return "float32 master";
    case MasterKind::kRemainder: return "int16 remainder";
    default: return "no master";
  }
}

std::string describe(const StorageTypes& s) {
  return std::string("parameter ") + c10::toString(s.param) + ", gradient " + c10::toString(s.grad) + ", moments " +
         (s.quantized() ? "8-bit" : c10::toString(s.moment)) + ", " + master_kind_name(s.master);
}

std::string supported_storage_list() {
  std::string out;
  for (const StorageTypes& t : kSupportedStorage) {
    out += "\n  " + describe(t);
  }
  return out;
}

void refuse_storage(const StorageTypes& s) {
  TORCH_CHECK(false, "fused_adamw_: unsupported storage (", describe(s), "); supported:", supported_storage_list());
}

size_t storage_index(const StorageTypes& s) {
  for (size_t k = 0; k < std::size(kSupportedStorage); ++k) {
    if (kSupportedStorage[k] == s) {
      return k;
    }
  }
  refuse_storage(s);
}

namespace {
constexpr c10::ScalarType kNamedDtypes[] = {c10::ScalarType::Double, c10::ScalarType::Float,
                                            c10::ScalarType::BFloat16, c10::ScalarType::Half, kQuantized};
constexpr MasterKind kNamedMasters[] = {MasterKind::kNone, MasterKind::kFloat32, MasterKind::kRemainder};
}  // namespace

const char* storage_dtype_name(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Double: return "float64";
    case c10::ScalarType::Float: return "float32";
    case c10::ScalarType::BFloat16: return "bfloat16";
    case c10::ScalarType::Half: return "float16";
    case kQuantized: return "8bit";
    default: return c10::toString(t);
  }
}

const char* storage_master_name(MasterKind k) {
  switch (k) {
    case MasterKind::kFloat32: return "float32";
    case MasterKind::kRemainder: return "remainder";
    default: return "none";
  }
}

StorageTypes storage_named(const std::string& param, const std::string& grad, const std::string& moment,
                           const std::string& master) {
  auto dtype = [](const std::string& name) {
    for (const c10::ScalarType t : kNamedDtypes) {
      if (name == storage_dtype_name(t)) {
        return t;
      }
    }
    TORCH_CHECK(false, "unknown storage dtype name '", name, "': use float64, float32, bfloat16, float16 or 8bit");
  };
  for (const MasterKind k : kNamedMasters) {
    if (master == storage_master_name(k)) {
      return {dtype(param), dtype(grad), dtype(moment), k};
    }
  }
  TORCH_CHECK(false, "unknown master name '", master, "': use none, float32 or remainder");
}

}  // namespace noam_ext

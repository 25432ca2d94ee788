// storage.h's names for error messages (out of line: see there).
#include "storage.h"

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
         c10::toString(s.moment) + ", " + master_kind_name(s.master);
}

std::string supported_storage_list() {
  std::string out;
  for (const StorageTypes& t : kSupportedStorage) {
    out += "\n  " + describe(t);
  }
  return out;
}

}  // namespace noam_ext

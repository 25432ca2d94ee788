#include "cpu_capability.h"

#include <c10/util/Exception.h>

#include <cstdlib>

namespace noam_ext::cpu {
namespace {

enum class Isa { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

Isa best_supported_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
#if defined(NOAM_EXT_HAVE_AVX512)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma")) {
    return Isa::kAvx512;
  }
#endif
#if defined(NOAM_EXT_HAVE_AVX2)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return Isa::kAvx2;
  }
#endif
#endif
  return Isa::kDefault;
}

// The environment can only lower the choice: asking for an instruction set
// the CPU lacks would crash, so such a request is clamped (as PyTorch does).
Isa requested_isa(Isa best) {
  const char* value = std::getenv("NOAM_EXT_CPU_CAPABILITY");
  if (value == nullptr || *value == '\0') {
    value = std::getenv("ATEN_CPU_CAPABILITY");
  }
  if (value == nullptr || *value == '\0') {
    return best;
  }
  const std::string name(value);
  Isa wanted = best;
  if (name == "default") {
    wanted = Isa::kDefault;
  } else if (name == "avx2") {
    wanted = Isa::kAvx2;
  } else if (name == "avx512") {
    wanted = Isa::kAvx512;
  } else {
    TORCH_WARN("noam_ext: ignoring unknown CPU capability '", name,
               "' (expected default, avx2 or avx512)");
  }
  return wanted < best ? wanted : best;
}

Isa active_isa() {
  static const Isa isa = requested_isa(best_supported_isa());
  return isa;
}

}  // namespace

const std::string& active_cpu_capability() {
  static const std::string names[] = {"default", "avx2", "avx512"};
  return names[static_cast<int>(active_isa())];
}

const char* compiled_cpu_capabilities() {
  return "default"
#if defined(NOAM_EXT_HAVE_AVX2)
         ",avx2"
#endif
#if defined(NOAM_EXT_HAVE_AVX512)
         ",avx512"
#endif
      ;
}

SegmentKernel select_segment_kernel(const StorageTypes& storage, bool amsgrad) {
  switch (active_isa()) {
#if defined(NOAM_EXT_HAVE_AVX512)
    case Isa::kAvx512: return select_segment_kernel_AVX512(storage, amsgrad);
#endif
#if defined(NOAM_EXT_HAVE_AVX2)
    case Isa::kAvx2: return select_segment_kernel_AVX2(storage, amsgrad);
#endif
    default: return select_segment_kernel_DEFAULT(storage, amsgrad);
  }
}

}  // namespace noam_ext::cpu

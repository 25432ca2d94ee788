// Which compiled instruction set the CPU op runs with.
#pragma once

#include <string>

#include "segment_kernel.h"

namespace noam_ext::cpu {

// Name of the instruction set in use: "default", "avx2" or "avx512". Chosen
// once per process: the best one this build compiled and this CPU supports,
// lowered by NOAM_EXT_CPU_CAPABILITY (or PyTorch's ATEN_CPU_CAPABILITY) when set.
const std::string& active_cpu_capability();

// Instruction sets compiled into this build, comma separated.
const char* compiled_cpu_capabilities();

// The element loop for a call's storage under the active instruction set (null for
// an unsupported one).
SegmentKernel select_segment_kernel(const StorageTypes& storage, bool amsgrad);

}  // namespace noam_ext::cpu

// The update kernels of bfloat16 parameters with 8-bit moments (the parameter its own master,
// or a float32 master, or its remainder): kSupportedStorage[14, 15, 16] of
// csrc/noam_ext/storage.h (csrc/cuda/quantized_walk.cuh), in a compilation unit of their own
// that nvcc builds beside the others (storage_units.cuh).
#include "storage_units.cuh"

namespace noam_ext::cuda_plan {
inline namespace NOAM_EXT_KERNELS_COPY {

NOAM_EXT_STORAGE_UNIT(14)
NOAM_EXT_STORAGE_UNIT(15)
NOAM_EXT_STORAGE_UNIT(16)

}  // inline namespace NOAM_EXT_KERNELS_COPY
}  // namespace noam_ext::cuda_plan

// The update kernels of float32 parameters (float32 or bfloat16 gradients) with 8-bit moments:
// kSupportedStorage[12, 13] of csrc/noam_ext/storage.h (csrc/cuda/quantized_walk.cuh), in a
// compilation unit of their own that nvcc builds beside the others (storage_units.cuh).
#include "storage_units.cuh"

namespace noam_ext::cuda_plan {
inline namespace NOAM_EXT_KERNELS_COPY {

NOAM_EXT_STORAGE_UNIT(12)
NOAM_EXT_STORAGE_UNIT(13)

}  // inline namespace NOAM_EXT_KERNELS_COPY
}  // namespace noam_ext::cuda_plan

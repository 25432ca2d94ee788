// The update kernels of float32 parameters with bfloat16 gradients, moments or both, and of
// float16 parameters with a float32 master:
// kSupportedStorage[4, 5, 6, 11] of csrc/noam_ext/storage.h, in a compilation unit of
// their own that nvcc builds beside the others (storage_units.cuh).
#include "storage_units.cuh"

namespace noam_ext::cuda_plan {
inline namespace NOAM_EXT_KERNELS_COPY {

NOAM_EXT_STORAGE_UNIT(4)
NOAM_EXT_STORAGE_UNIT(5)
NOAM_EXT_STORAGE_UNIT(6)
NOAM_EXT_STORAGE_UNIT(11)

}  // inline namespace NOAM_EXT_KERNELS_COPY
}  // namespace noam_ext::cuda_plan

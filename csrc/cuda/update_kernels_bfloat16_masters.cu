// The update kernels of bfloat16 parameters with a float32 master or an int16 remainder,
// float32 or bfloat16 moments:
// kSupportedStorage[7, 8, 9, 10] of csrc/noam_ext/storage.h, in a compilation unit of
// their own that nvcc builds beside the others (storage_units.cuh).
#include "storage_units.cuh"

namespace noam_ext::cuda_plan {
inline namespace NOAM_EXT_KERNELS_COPY {

NOAM_EXT_STORAGE_UNIT(7)
NOAM_EXT_STORAGE_UNIT(8)
NOAM_EXT_STORAGE_UNIT(9)
NOAM_EXT_STORAGE_UNIT(10)

}  // inline namespace NOAM_EXT_KERNELS_COPY
}  // namespace noam_ext::cuda_plan

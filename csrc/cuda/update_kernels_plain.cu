// The update kernels of torch's own storages (every tensor in the parameter's dtype: float64, float32,
// bfloat16, float16):
// kSupportedStorage[0, 1, 2, 3] of csrc/noam_ext/storage.h, in a compilation unit of
// their own that nvcc builds beside the others (storage_units.cuh).
#include "storage_units.cuh"

namespace noam_ext::cuda_plan {
inline namespace NOAM_EXT_KERNELS_COPY {

NOAM_EXT_STORAGE_UNIT(0)
NOAM_EXT_STORAGE_UNIT(1)
NOAM_EXT_STORAGE_UNIT(2)
NOAM_EXT_STORAGE_UNIT(3)

}  // inline namespace NOAM_EXT_KERNELS_COPY
}  // namespace noam_ext::cuda_plan

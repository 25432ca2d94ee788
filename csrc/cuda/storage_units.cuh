// The update kernels are compiled in translation units of their own, a few storages of
// csrc/noam_ext/storage.h each (update_kernels_*.cu), which nvcc builds side by side;
// adamw_cuda.cu launches them through the functions each unit defines here. A unit's
// functions name its kernels where nvcc compiles them, so the launch pointers they
// return are that unit's kernel stubs (tests/gpu_kernels/test_linked_extension.py checks all of them).
#pragma once

#include "kernels_namespace.h"

#include <cstdint>
#include <vector>

#include "launch_pointers.h"
#include "kernels.cuh"

namespace noam_ext::cuda_plan {
inline namespace NOAM_EXT_KERNELS_COPY {

// The storages, by index into kSupportedStorage: one unit defines each (the static_assert
// in adamw_cuda.cu holds this list to storage.h's).
#define NOAM_EXT_FOR_EACH_STORAGE(X) \
  X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15) X(16)

// The launches of one call of storage k (step_launches_for), and for tests every kernel of
// storage k as its unit names it, beside what step_launches_for returns.
#define NOAM_EXT_DECLARE_STORAGE_UNIT(k)                                                                  \
  StepLaunches launches_of_storage_##k(bool amsgrad, int64_t num_rows, int64_t total, int64_t multiprocessors, \
                                       bool strided_rows);                                                  \
  void launch_pointers_of_storage_##k(std::vector<cuda::LaunchPointers>& out);
NOAM_EXT_FOR_EACH_STORAGE(NOAM_EXT_DECLARE_STORAGE_UNIT)
#undef NOAM_EXT_DECLARE_STORAGE_UNIT

#if defined(__CUDACC__)
// The kernels of kSupportedStorage[kStorage] as this unit names them (nvcc's host stubs),
// beside what step_launches_for returns for a call with strided rows.
template <int kStorage, bool amsgrad>
void add_launch_pointers(std::vector<cuda::LaunchPointers>& out) {
  using opmath_t = typename StorageTraits<kStorage>::opmath_t;
  const StepLaunches launched = step_launches_for<kStorage, amsgrad>(1, 1, 132, true);
  const KernelFunction prepare = &prepare_kernel<opmath_t>;
  const KernelFunction update = &update_kernel<kStorage, amsgrad>;
  const KernelFunction strided = &strided_kernel<kStorage, amsgrad>;
  auto address = [](KernelFunction f) { return reinterpret_cast<const void*>(f); };
  out.push_back({kStorage, amsgrad, "prepare", address(launched.prepare.kernel), address(prepare)});
  out.push_back({kStorage, amsgrad, "update", address(launched.update.kernel), address(update)});
  out.push_back({kStorage, amsgrad, "strided", address(launched.strided.kernel), address(strided)});
}

// Defines storage k's functions in the unit that compiles its kernels.
#define NOAM_EXT_STORAGE_UNIT(k)                                                                           \
  StepLaunches launches_of_storage_##k(bool amsgrad, int64_t num_rows, int64_t total, int64_t multiprocessors, \
                                       bool strided_rows) {                                                 \
    return amsgrad ? step_launches_for<k, true>(num_rows, total, multiprocessors, strided_rows)              \
                   : step_launches_for<k, false>(num_rows, total, multiprocessors, strided_rows);            \
  }                                                                                                         \
  void launch_pointers_of_storage_##k(std::vector<cuda::LaunchPointers>& out) {                             \
    add_launch_pointers<k, false>(out);                                                                     \
    add_launch_pointers<k, true>(out);                                                                      \
  }
#endif

}  // inline namespace NOAM_EXT_KERNELS_COPY
}  // namespace noam_ext::cuda_plan

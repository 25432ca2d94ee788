// What run_rows would launch beside the kernels as their compilation unit names them, for
// tests (noam_ext._C.cuda_launch_pointers; tests/gpu_kernels/test_linked_extension.py): kept free of
// ATen so that the kernels' units (storage_units.cuh) stay light to compile.
#pragma once

namespace noam_ext::cuda {

// For each storage of storage.h, with and without amsgrad, and each launch (prepare,
// update, strided): the function that step_launches_for (kernels.cuh) returns, and nvcc's
// kernel stub for the same kernel, taken in the unit that compiles it. They differ when
// the linker replaced the kernels' code with another compilation's copy
// (kernels_namespace.h).
struct LaunchPointers {
  int storage;            // index into kSupportedStorage
  bool amsgrad;
  const char* launch;     // "prepare", "update" or "strided"
  const void* launched;   // from step_launches_for
  const void* stub;       // taken in the kernels' unit
};

}  // namespace noam_ext::cuda

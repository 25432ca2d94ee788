// The inline namespace that the kernels' headers (launch_policy.cuh, call_args.cuh,
// vector_access.cuh, element_update.cuh, multi_tensor_walk.cuh, kernels.cuh, kernel_args.h)
// put everything in, named after the compilation that compiles them:
// device_build in the .cu files that nvcc compiles for the GPU, host_run where the
// kernels' code is compiled as plain C++ (tests/host_run/, after cuda_host_shims.h).
// Inline functions and template instantiations are weak symbols; without distinct
// names, a binary holding both compilations keeps one copy of each, and a launch site
// could end up with the host run's functions instead of nvcc's kernel stubs (as
// segment_kernel_impl.h does per instruction set with CPU_CAPABILITY).
// scripts/audit_symbols.py and tests/cuda/test_launch_pointers.py check the built .so.
#pragma once

#if defined(NOAM_EXT_KERNELS_ON_HOST)
#define NOAM_EXT_KERNELS_COPY host_run
#else
#define NOAM_EXT_KERNELS_COPY device_build
#endif

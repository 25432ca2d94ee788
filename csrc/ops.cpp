// The op schemas, in one place. Implementations are registered per device in
// their own files (cpu/adamw_cpu.cpp, cuda/adamw_cuda.cu, cpu/cuda_emulation.cpp);
// the fake (meta) implementations used by torch.compile and fake tensors live in
// noam_ext/_ops.py, and the Python module itself in python_module.cpp.
#include <torch/library.h>

TORCH_LIBRARY(noam_ext, m) {
  // One AdamW step over flat buffers holding many parameters (segments).
  //   segments:       int64 [n, 3] rows (offset, numel, group) on the buffers' device
  //   hyper:          float64 [groups, 9] on the CPU: lr, betas, eps, weight decay, Noam
  //                   settings, amsgrad and maximize per group (csrc/noam_ext/adamw_math.h)
  //   max_exp_avg_sq: needed when any group has amsgrad
  //   param_steps:    float32 [n], each parameter's step count (torch's state['step'])
  //   schedule_step:  int64 [2]: completed steps of the in-op Noam schedule, and a
  //                   counter the CUDA kernel uses within a launch (zero between calls)
  //   active:         bool [n] or None (all active); inactive parameters are left untouched
  //   grad_scale, found_inf: torch.amp.GradScaler's tensors; when found_inf is
  //                   non-zero the step changes nothing at all.
  m.def(
      "fused_adamw_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "Tensor(d!)? max_exp_avg_sq, Tensor(e!) param_steps, Tensor(f!) schedule_step, "
      "Tensor segments, Tensor hyper, Tensor? active, *, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // The CUDA kernel's work split and math, run on the host over an emulated
  // grid of num_blocks x threads_per_block (same arguments, CPU tensors), so
  // that CI tests the kernel's indexing without a GPU (csrc/cpu/cuda_emulation.cpp).
  m.def(
      "emulate_cuda_fused_adamw_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, "
      "Tensor(c!) exp_avg_sq, Tensor(d!)? max_exp_avg_sq, Tensor(e!) param_steps, "
      "Tensor(f!) schedule_step, Tensor segments, Tensor hyper, Tensor? active, *, "
      "int num_blocks, int threads_per_block, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
}

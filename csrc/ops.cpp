// The op schemas, in one place, and the Python module that loads them.
//
// Implementations are registered per device in their own files
// (cpu/adamw_cpu.cpp, cuda/adamw_cuda.cu); the fake (meta) implementation used
// by torch.compile and fake tensors lives in noam_ext/_ops.py.
#include <Python.h>
#include <torch/library.h>

#include "cpu/cpu_capability.h"

TORCH_LIBRARY(noam_ext, m) {
  // One AdamW step over flat buffers holding many parameters (segments).
  //   segments:       int64 [n, 3] rows (offset, numel, group) on the buffers' device
  //   hyper:          float64 [groups, 9] on the CPU: lr, betas, eps, weight decay, Noam
  //                   settings, amsgrad and maximize per group (csrc/noam_ext/adamw_math.h)
  //   max_exp_avg_sq: needed when any group has amsgrad
  //   param_steps:    float32 [n], each parameter's step count (torch's state['step'])
  //   schedule_step:  int64 [1], completed steps of the in-op Noam schedule
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

namespace {

PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(noam_ext::cpu::active_cpu_capability().c_str());
}

PyMethodDef module_methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "Instruction set the CPU op runs with: default, avx2 or avx512."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_C",
    "noam_ext's compiled ops; importing it registers torch.ops.noam_ext.*", -1, module_methods,
};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) {
    return nullptr;
  }
  PyModule_AddStringConstant(module, "compiled_cpu_capabilities",
                             noam_ext::cpu::compiled_cpu_capabilities());
#if defined(NOAM_EXT_WITH_CUDA)
  PyModule_AddIntConstant(module, "cuda_compiled", 1);
#else
  PyModule_AddIntConstant(module, "cuda_compiled", 0);
#endif
  return module;
}

// The noam_ext._C Python module: importing it loads the library, which
// registers the ops (ops.cpp and the per-device files). Besides build facts it
// offers one helper for FusedAdamW.step()'s hot path that would cost a Python
// attribute access per parameter if written in Python.
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

#include "cpu/cpu_capability.h"

namespace {

PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(noam_ext::cpu::active_cpu_capability().c_str());
}

// grad_status(params: list[Tensor], param_addresses: Tensor, grad_addresses: Tensor) -> bytes
// One byte per parameter, for FusedAdamW.step()'s hot path (Python's p.grad
// costs ~300 ns per access; this is a few ns per parameter):
//   0  .grad is the parameter's view of the flat gradient buffer
//   1  .grad is None
//   2  .grad is some other tensor (replaced by autograd or assigned)
//   3  the parameter itself no longer lives in the flat buffer (p.data was replaced)
PyObject* grad_status(PyObject*, PyObject* args) {
  PyObject* params = nullptr;
  PyObject* param_obj = nullptr;
  PyObject* grad_obj = nullptr;
  if (!PyArg_ParseTuple(args, "O!OO", &PyList_Type, &params, &param_obj, &grad_obj)) {
    return nullptr;
  }
  const Py_ssize_t n = PyList_GET_SIZE(params);
  const int64_t* addresses[2] = {nullptr, nullptr};
  PyObject* objects[2] = {param_obj, grad_obj};
  for (int k = 0; k < 2; ++k) {
    if (!THPVariable_Check(objects[k])) {
      PyErr_SetString(PyExc_TypeError, "grad_status: addresses must be tensors");
      return nullptr;
    }
    const at::Tensor& t = THPVariable_Unpack(objects[k]);
    if (t.scalar_type() != at::kLong || !t.is_cpu() || !t.is_contiguous() || t.numel() != n) {
      PyErr_SetString(PyExc_ValueError, "grad_status: addresses must be contiguous int64 CPU tensors, one per param");
      return nullptr;
    }
    addresses[k] = t.const_data_ptr<int64_t>();
  }
  PyObject* out = PyBytes_FromStringAndSize(nullptr, n);
  if (out == nullptr) {
    return nullptr;
  }
  char* status = PyBytes_AS_STRING(out);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(params, i);
    if (!THPVariable_Check(item)) {
      Py_DECREF(out);
      PyErr_SetString(PyExc_TypeError, "grad_status: params must be tensors");
      return nullptr;
    }
    const at::Tensor& param = THPVariable_Unpack(item);
    const at::Tensor& grad = param.grad();
    if (reinterpret_cast<int64_t>(param.data_ptr()) != addresses[0][i]) {
      status[i] = 3;
    } else if (!grad.defined()) {
      status[i] = 1;
    } else {
      status[i] = reinterpret_cast<int64_t>(grad.data_ptr()) == addresses[1][i] ? 0 : 2;
    }
  }
  return out;
}

PyMethodDef module_methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "Instruction set the CPU op runs with: default, avx2 or avx512."},
    {"grad_status", grad_status, METH_VARARGS,
     "One byte per param: 0 grad is its flat view, 1 None, 2 another tensor, 3 param moved."},
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

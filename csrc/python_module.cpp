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

// first_foreign_grad(params: list[Tensor], expected: Tensor[int64]) -> int
// Index of the first parameter whose .grad is missing or does not start at
// expected[i] (its slot in the flat gradient buffer); -1 when every gradient
// is in place. About 5 ns per parameter instead of ~300 ns for `p.grad` in Python.
PyObject* first_foreign_grad(PyObject*, PyObject* args) {
  PyObject* params = nullptr;
  PyObject* expected_obj = nullptr;
  if (!PyArg_ParseTuple(args, "O!O", &PyList_Type, &params, &expected_obj)) {
    return nullptr;
  }
  if (!THPVariable_Check(expected_obj)) {
    PyErr_SetString(PyExc_TypeError, "first_foreign_grad: expected must be a tensor");
    return nullptr;
  }
  const at::Tensor& expected = THPVariable_Unpack(expected_obj);
  const Py_ssize_t n = PyList_GET_SIZE(params);
  if (expected.scalar_type() != at::kLong || !expected.is_cpu() || !expected.is_contiguous() ||
      expected.numel() != n) {
    PyErr_SetString(PyExc_ValueError, "first_foreign_grad: expected must be a contiguous int64 CPU tensor, one per param");
    return nullptr;
  }
  const int64_t* want = expected.const_data_ptr<int64_t>();
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(params, i);
    if (!THPVariable_Check(item)) {
      PyErr_SetString(PyExc_TypeError, "first_foreign_grad: params must be tensors");
      return nullptr;
    }
    const at::Tensor& grad = THPVariable_Unpack(item).grad();
    if (!grad.defined() || reinterpret_cast<int64_t>(grad.data_ptr()) != want[i]) {
      return PyLong_FromSsize_t(i);
    }
  }
  return PyLong_FromLong(-1);
}

PyMethodDef module_methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "Instruction set the CPU op runs with: default, avx2 or avx512."},
    {"first_foreign_grad", first_foreign_grad, METH_VARARGS,
     "Index of the first param whose .grad is not at its expected address, or -1."},
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

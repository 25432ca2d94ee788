// Reading the objects torch keeps an optimizer's tensors in (parameters, their
// .grad, optimizer.state, param_groups) from C++, for FusedAdamW.step()'s host path
// (python_module.cpp): tensors are borrowed from the Python objects that hold
// them, never copied or reference-counted, and tensor subclasses that wrap a local
// tensor (DTensor) are read through that local shard.
#pragma once

#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "noam_ext/storage.h"

namespace noam_ext::step {

namespace py = pybind11;

// The tensor the op works on: the tensor itself, or for a tensor subclass that
// wraps a local tensor (DTensor under FSDP2 or tensor parallelism) that local
// shard, which is what torch's own fused optimizers update. The reference stays
// valid while `obj` lives (a DTensor holds its local tensor).
inline bool is_tensor(PyObject* obj) {
  // A subtype test on the type's MRO: THPVariable_Check's PyObject_IsInstance goes
  // through the metaclass (torch.nn.Parameter's is _ParameterMeta), several times slower,
  // and only a real subtype has the tensor THPVariable_Unpack reads.
  return THPVariableClass != nullptr &&
         (THPVariable_CheckExact(obj) || PyType_IsSubtype(Py_TYPE(obj), reinterpret_cast<PyTypeObject*>(THPVariableClass)));
}

inline const at::Tensor& local_tensor(PyObject* obj, const char* what) {
  if (!is_tensor(obj)) {
    throw py::type_error(std::string("FusedAdamW: ") + what + " is not a tensor");
  }
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!t.unsafeGetTensorImpl()->is_python_dispatch()) {
    return t;
  }
  py::object local = py::reinterpret_steal<py::object>(PyObject_GetAttrString(obj, "_local_tensor"));
  if (!local) {
    PyErr_Clear();
    return t;
  }
  return local_tensor(local.ptr(), what);
}

inline const at::Tensor& undefined_tensor() {
  static const at::Tensor undefined;
  return undefined;
}

// p.grad, unwrapped as above; undefined for None.
inline const at::Tensor& local_grad(PyObject* param_obj, const at::Tensor& param) {
  if (!THPVariable_Unpack(param_obj).unsafeGetTensorImpl()->is_python_dispatch()) {
    return param.grad();
  }
  py::object grad = py::reinterpret_steal<py::object>(PyObject_GetAttrString(param_obj, "grad"));
  if (!grad) {
    throw py::error_already_set();
  }
  // The gradient object outlives this call: the parameter holds it.
  return grad.is_none() ? undefined_tensor() : local_tensor(grad.ptr(), "a gradient");
}

// A list of tensors borrowed from the Python objects that hold them (the
// parameters, their gradients, optimizer.state), without touching reference
// counts: a tensor that has a Python object pays for a GIL round trip on every
// copy, which at hundreds of tensors a step is most of the step's fixed cost.
// Used only within one call from Python, while those objects are alive.
class BorrowedTensors {
 public:
  BorrowedTensors() = default;
  BorrowedTensors(const BorrowedTensors&) = delete;
  BorrowedTensors& operator=(const BorrowedTensors&) = delete;
  BorrowedTensors(BorrowedTensors&& other) noexcept : tensors_(std::move(other.tensors_)) {}
  ~BorrowedTensors() {
    for (auto& t : tensors_) {
      c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
    }
  }
  void push_back(const at::Tensor& t) { tensors_.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(t)); }
  void reserve(size_t n) { tensors_.reserve(n); }  // never shrinks
  size_t size() const { return tensors_.size(); }
  bool empty() const { return tensors_.empty(); }
  const at::Tensor& operator[](size_t i) const { return tensors_[i]; }
  operator at::TensorList() const { return tensors_; }

 private:
  std::vector<at::Tensor> tensors_;
};

// "parameter 3 of param group 1 (shape (4, 5))": how errors name a parameter.
inline std::string param_name(int64_t group, int64_t index, const at::Tensor& p) {
  std::string shape = "(";
  for (size_t d = 0; d < p.sizes().size(); ++d) {
    shape += (d ? ", " : "") + std::to_string(p.sizes()[d]);
  }
  shape += p.sizes().size() == 1 ? ",)" : ")";
  return "parameter " + std::to_string(index) + " of param group " + std::to_string(group) + " (shape " + shape +
         ")";
}

// dict[key] (borrowed), or null when absent; a failing lookup raises.
inline PyObject* dict_item(PyObject* dict, PyObject* key) {
  PyObject* value = PyDict_GetItemWithError(dict, key);  // borrowed
  if (value == nullptr && PyErr_Occurred()) {
    throw py::error_already_set();
  }
  return value;
}

// optimizer.state by parameter identity, without hashing (a tensor's __hash__ is a
// Python function): the dict's entries are read in order, and since state is
// created in parameter order they usually come in the order asked for; any other
// order falls back to a map. Keys that are not tensors (load hooks may add some) and
// values that are not dicts are ignored.
class StateIndex {
 public:
  explicit StateIndex(PyObject* state) {
    entries_.reserve(static_cast<size_t>(PyDict_Size(state)));
    Py_ssize_t pos = 0;
    PyObject *key = nullptr, *value = nullptr;
    while (PyDict_Next(state, &pos, &key, &value)) {
      if (PyDict_Check(value)) {
        entries_.emplace_back(key, value);
      }
    }
  }

  // The state dict of `param`, or null.
  PyObject* find(PyObject* param) {
    if (cursor_ < entries_.size() && entries_[cursor_].first == param) {
      return entries_[cursor_++].second;
    }
    if (by_key_.empty() && !entries_.empty()) {  // built on the first miss
      by_key_.insert(entries_.begin(), entries_.end());
    }
    const auto found = by_key_.find(param);
    if (found == by_key_.end()) {
      return nullptr;
    }
    for (size_t k = 0; k < entries_.size(); ++k) {  // continue in order from the entry found
      if (entries_[k].first == param) {
        cursor_ = k + 1;
        break;
      }
    }
    return found->second;
  }

 private:
  std::vector<std::pair<PyObject*, PyObject*>> entries_;
  size_t cursor_ = 0;
  std::unordered_map<PyObject*, PyObject*> by_key_;
};

// The entries of one parameter's state dict that the step reads (borrowed; null
// when absent), found in one pass over the (small) dict: no hashing, and keys are
// usually the interned strings themselves (a loaded state dict's are compared).
struct StateEntries {
  PyObject* step = nullptr;
  PyObject* exp_avg = nullptr;
  PyObject* exp_avg_sq = nullptr;
  PyObject* max_exp_avg_sq = nullptr;
  PyObject* master_param = nullptr;       // float32 master weights (FusedAdamW's master_weights="float32")
  PyObject* master_remainder = nullptr;   // int16 remainders (master_weights="remainder")
  // 8-bit moments (moment_dtype="8bit"): [moment][0] its codes, [moment][1] its scales, for
  // exp_avg, exp_avg_sq and max_exp_avg_sq (storage.h, kQuantizedStateKeys).
  PyObject* quantized[3][2] = {{nullptr, nullptr}, {nullptr, nullptr}, {nullptr, nullptr}};
};

inline StateEntries read_state_entries(PyObject* state) {
  constexpr int kCount = 12;
  static const char* const kKeyNames[kCount] = {
      "step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq",
      kMasterStateKeys[static_cast<int>(MasterKind::kFloat32)], kMasterStateKeys[static_cast<int>(MasterKind::kRemainder)],
      kQuantizedStateKeys[0][0], kQuantizedStateKeys[0][1], kQuantizedStateKeys[1][0], kQuantizedStateKeys[1][1],
      kQuantizedStateKeys[2][0], kQuantizedStateKeys[2][1]};
  static PyObject* const* const kKeys = [] {
    static PyObject* keys[kCount];
    for (int k = 0; k < kCount; ++k) {
      keys[k] = PyUnicode_InternFromString(kKeyNames[k]);
    }
    return keys;
  }();
  StateEntries out;
  PyObject** slots[kCount] = {&out.step,           &out.exp_avg,           &out.exp_avg_sq,
                              &out.max_exp_avg_sq, &out.master_param,      &out.master_remainder,
                              &out.quantized[0][0], &out.quantized[0][1],  &out.quantized[1][0],
                              &out.quantized[1][1], &out.quantized[2][0],  &out.quantized[2][1]};
  Py_ssize_t pos = 0;
  PyObject *key = nullptr, *value = nullptr;
  while (PyDict_Next(state, &pos, &key, &value)) {
    int found = -1;
    for (int k = 0; k < kCount && found < 0; ++k) {   // the interned keys themselves, usually
      found = key == kKeys[k] ? k : -1;
    }
    for (int k = 0; k < kCount && found < 0 && PyUnicode_Check(key); ++k) {   // equal strings (a loaded dict's)
      found = PyUnicode_CompareWithASCIIString(key, kKeyNames[k]) == 0 ? k : -1;
    }
    if (found >= 0) {
      *slots[found] = value;
    }
  }
  return out;
}

}  // namespace noam_ext::step

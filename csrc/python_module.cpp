// The noam_ext._C Python module (pybind11): importing it loads the library,
// which registers the ops (ops.cpp and the per-device files). Besides build
// facts it holds FusedAdamW.step()'s hot path, which would cost about half a
// microsecond of Python per parameter: reading every parameter's gradient and
// optimizer state where torch keeps them (param_groups, p.grad, optimizer.state),
// checking them, and calling the op once per (device, dtype, amsgrad).
//
// Every C++ exception becomes a Python exception (pybind11 translates them); no
// function here changes anything before all its checks have passed.
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/extension.h>

#include <algorithm>
#include <map>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cpu/cpu_capability.h"
#include "noam_ext/op_checks.h"
#include "noam_ext/run_rows.h"

namespace py = pybind11;

namespace noam_ext {
namespace {

// ---- reading tensors as torch keeps them --------------------------------------------------

// The tensor the op works on: the tensor itself, or for a tensor subclass that
// wraps a local tensor (DTensor under FSDP2 or tensor parallelism) that local
// shard, which is what torch's own fused optimizers update. The reference stays
// valid while `obj` lives (a DTensor holds its local tensor).
const at::Tensor& local_tensor(PyObject* obj, const char* what) {
  if (!THPVariable_CheckExact(obj) && !THPVariable_Check(obj)) {
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

const at::Tensor& undefined_tensor() {
  static const at::Tensor undefined;
  return undefined;
}

// p.grad, unwrapped as above; undefined for None.
const at::Tensor& local_grad(PyObject* param_obj, const at::Tensor& param) {
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

std::string param_name(int64_t group, int64_t index, const at::Tensor& p) {
  std::string shape = "(";
  for (size_t d = 0; d < p.sizes().size(); ++d) {
    shape += (d ? ", " : "") + std::to_string(p.sizes()[d]);
  }
  shape += p.sizes().size() == 1 ? ",)" : ")";
  return "parameter " + std::to_string(index) + " of param group " + std::to_string(group) + " (shape " + shape +
         ")";
}

// ---- the plan of one step ---------------------------------------------------------------

// Everything of one (device, dtype, amsgrad) that takes part in this step.
struct Bucket {
  // Declared first, destroyed last: tensors made for this step (real views of
  // complex tensors) that the lists below borrow.
  std::vector<at::Tensor> owned;
  at::Device device{at::kCPU};
  at::ScalarType dtype{at::kFloat};
  bool amsgrad = false;
  BorrowedTensors params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps;
  std::vector<int64_t> rows;          // per param: its param group (its row of the hyper table)
  std::vector<std::pair<int64_t, int64_t>> where;   // per param: (group, index in group)
  std::vector<int32_t> rounds;        // per param: which of the bucket's calls updates it
  int32_t num_rounds = 1;
  void reserve_more(size_t n) {
    for (BorrowedTensors* list : {&params, &grads, &exp_avgs, &exp_avg_sqs, &max_exp_avg_sqs, &steps}) {
      list->reserve(list->size() + n);
    }
    rows.reserve(rows.size() + n);
    where.reserve(where.size() + n);
    single_call_rows.reserve(single_call_rows.size() + n);
  }
  // Rows of the whole bucket as one call, checked as collected.
  std::vector<TensorRow> single_call_rows;
  int64_t single_call_total = 0;
  // Filled by StepPlan::check(): per round, the checked rows and their virtual length.
  std::vector<std::vector<TensorRow>> call_rows;
  std::vector<int64_t> call_totals;
};

// Parameters that share memory (weights tied through .data, the same parameter
// twice) must be updated one after the other, as torch.optim.AdamW's loop does:
// each gets a round, one more than the latest earlier parameter it overlaps,
// and each round is a call of its own.
void assign_rounds(Bucket& b) {
  const int64_t n = static_cast<int64_t>(b.params.size());
  b.rounds.assign(n, 0);
  b.num_rounds = 1;
  std::vector<std::tuple<uintptr_t, uintptr_t, int64_t>> spans;  // [start, end), position
  spans.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = b.params[i];
    if (p.numel() > 0) {
      const auto start = reinterpret_cast<uintptr_t>(p.data_ptr());
      spans.emplace_back(start, start + p.numel() * p.element_size(), i);
    }
  }
  // Parameters created one after the other usually lie in ascending memory: then one
  // pass shows that none overlaps, and the sort is not needed.
  bool disjoint_in_order = true;
  for (size_t k = 1; k < spans.size() && disjoint_in_order; ++k) {
    disjoint_in_order = std::get<0>(spans[k]) >= std::get<1>(spans[k - 1]);
  }
  if (disjoint_in_order) {
    return;
  }
  std::sort(spans.begin(), spans.end());
  // Clusters of spans chained by overlap; within one, rounds in list order.
  size_t k = 0;
  while (k < spans.size()) {
    size_t end = k + 1;
    uintptr_t reach = std::get<1>(spans[k]);
    while (end < spans.size() && std::get<0>(spans[end]) < reach) {
      reach = std::max(reach, std::get<1>(spans[end]));
      ++end;
    }
    if (end - k > 1) {
      std::vector<std::tuple<int64_t, uintptr_t, uintptr_t>> members;  // position, start, end
      for (size_t m = k; m < end; ++m) {
        members.emplace_back(std::get<2>(spans[m]), std::get<0>(spans[m]), std::get<1>(spans[m]));
      }
      std::sort(members.begin(), members.end());
      for (size_t a = 0; a < members.size(); ++a) {
        int32_t round = 0;
        for (size_t c = 0; c < a; ++c) {
          const bool overlap = std::get<1>(members[c]) < std::get<2>(members[a]) &&
                               std::get<1>(members[a]) < std::get<2>(members[c]);
          if (overlap) {
            round = std::max(round, b.rounds[std::get<0>(members[c])] + 1);
          }
        }
        b.rounds[std::get<0>(members[a])] = round;
        b.num_rounds = std::max(b.num_rounds, round + 1);
      }
    }
    k = end;
  }
}

struct CallLists {
  BorrowedTensors params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps;
  std::vector<int64_t> rows;
  std::vector<std::pair<int64_t, int64_t>> where;
};

CallLists round_lists(const Bucket& b, int32_t round) {
  CallLists c;
  for (size_t i = 0; i < b.params.size(); ++i) {
    if (b.rounds[i] != round) {
      continue;
    }
    c.params.push_back(b.params[i]);
    c.grads.push_back(b.grads[i]);
    c.exp_avgs.push_back(b.exp_avgs[i]);
    c.exp_avg_sqs.push_back(b.exp_avg_sqs[i]);
    if (b.amsgrad) {
      c.max_exp_avg_sqs.push_back(b.max_exp_avg_sqs[i]);
    }
    c.steps.push_back(b.steps[i]);
    c.rows.push_back(b.rows[i]);
    c.where.push_back(b.where[i]);
  }
  return c;
}

class StepPlan {
 public:
  // Parameters with a gradient but no optimizer state yet, as (group, index):
  // FusedAdamW creates their state (as torch does lazily) and collects again.
  std::vector<std::pair<int64_t, int64_t>> stateless;
  // Parameters whose state["step"] is not a one-element float32 tensor on the
  // parameter's device (a torch.optim.AdamW checkpoint keeps it on the CPU):
  // FusedAdamW moves it there and collects again.
  std::vector<std::pair<int64_t, int64_t>> misplaced_steps;
  std::vector<Bucket> buckets;
  int64_t num_groups = 0;             // rows of the hyper table

  std::vector<at::Device> devices() const {
    std::vector<at::Device> out;
    for (const Bucket& b : buckets) {
      if (std::find(out.begin(), out.end(), b.device) == out.end()) {
        out.push_back(b.device);
      }
    }
    return out;
  }

  bool ready() const { return stateless.empty() && misplaced_steps.empty(); }

  // Checks every call this plan will make, naming parameters, before any is
  // made, and keeps each call's rows for run().
  void check() {
    for (Bucket& b : buckets) {
      const int64_t n_rows = num_groups;
      b.call_rows.clear();
      b.call_totals.assign(b.num_rounds, 0);
      if (b.num_rounds == 1) {  // the common case: the rows checked while collecting
        check_distinct_steps(b.single_call_rows, [&b](int64_t i) {
          return param_name(b.where[i].first, b.where[i].second, b.params[i]);
        });
        b.call_rows.push_back(std::move(b.single_call_rows));
        b.call_totals[0] = b.single_call_total;
        continue;
      }
      for (int32_t round = 0; round < b.num_rounds; ++round) {
        const CallLists c = round_lists(b, round);
        const auto name_of = [&c](int64_t i) {
          return param_name(c.where[i].first, c.where[i].second, c.params[i]);
        };
        b.call_rows.push_back(build_tensor_rows({c.params, c.grads, c.exp_avgs, c.exp_avg_sqs, c.max_exp_avg_sqs,
                                                 c.steps},
                                                b.device, n_rows, c.rows, b.call_totals[round], name_of));
      }
    }
  }

  // Makes the calls, on each device with that device's schedule counter,
  // GradScaler tensors and hyperparameter table (given in devices() order). On
  // each device only the last call advances the schedule.
  void run(const std::vector<at::Tensor>& hypers, const std::vector<at::Tensor>& counters,
           const std::vector<std::optional<at::Tensor>>& grad_scales,
           const std::vector<std::optional<at::Tensor>>& found_infs,
           const std::vector<std::optional<at::Tensor>>& grad_clips) const {
    const std::vector<at::Device> devs = devices();
    std::vector<size_t> last_call_of_device(devs.size(), 0);
    for (size_t k = 0; k < buckets.size(); ++k) {
      last_call_of_device[device_index(devs, buckets[k].device)] = k;
    }
    for (size_t k = 0; k < buckets.size(); ++k) {
      const Bucket& b = buckets[k];
      const size_t d = device_index(devs, b.device);
      const at::Tensor& table = hypers[d];
      for (int32_t round = 0; round < b.num_rounds; ++round) {
        // The device implementations behind torch.ops.noam_ext.fused_adamw_, given
        // the rows check() built: no second check, no dispatcher round trip.
        const RowsCall call{b.call_rows[round], b.call_totals[round], b.dtype, b.amsgrad, counters[d], table,
                            last_call_of_device[d] == k && round == b.num_rounds - 1, grad_scales[d], found_infs[d],
                            grad_clips[d]};
        if (b.device.is_cpu()) {
          cpu::run_rows(call);
#if defined(NOAM_EXT_WITH_CUDA)
        } else if (b.device.is_cuda()) {
          cuda::run_rows(call);
#endif
        } else {
          TORCH_CHECK(false, "FusedAdamW: no implementation for parameters on ", b.device);
        }
      }
      // What autograd's in-place machinery does for torch's optimizers: bump the
      // parameters' versions, so that autograd refuses a backward through values
      // this step overwrote.
      for (size_t i = 0; i < b.params.size(); ++i) {
        torch::autograd::increment_version(b.params[i]);
      }
    }
  }

 private:
  static size_t device_index(const std::vector<at::Device>& devs, const at::Device& d) {
    return static_cast<size_t>(std::find(devs.begin(), devs.end(), d) - devs.begin());
  }
};

PyObject* dict_item(PyObject* dict, PyObject* key_string) {
  PyObject* value = PyDict_GetItemWithError(dict, key_string);  // borrowed
  if (value == nullptr && PyErr_Occurred()) {
    throw py::error_already_set();
  }
  return value;
}

// Reads param_groups and optimizer.state as they are now and plans the step.
std::unique_ptr<StepPlan> collect(py::list param_groups, py::dict state) {
  static PyObject* const kParams = PyUnicode_InternFromString("params");
  static PyObject* const kAmsgrad = PyUnicode_InternFromString("amsgrad");
  static PyObject* const kStep = PyUnicode_InternFromString("step");
  static PyObject* const kExpAvg = PyUnicode_InternFromString("exp_avg");
  static PyObject* const kExpAvgSq = PyUnicode_InternFromString("exp_avg_sq");
  static PyObject* const kMaxExpAvgSq = PyUnicode_InternFromString("max_exp_avg_sq");

  // optimizer.state by parameter identity, without hashing (a tensor's __hash__
  // is a Python function): the dict's entries are read in order, and since state
  // is created in parameter order they usually come in the order asked for; any
  // other order falls back to a map. Keys that are not tensors (load hooks may
  // add some) and values that are not dicts are ignored.
  std::vector<std::pair<PyObject*, PyObject*>> entries;
  entries.reserve(static_cast<size_t>(PyDict_Size(state.ptr())));
  {
    Py_ssize_t pos = 0;
    PyObject *key = nullptr, *value = nullptr;
    while (PyDict_Next(state.ptr(), &pos, &key, &value)) {
      if (PyDict_Check(value)) {
        entries.emplace_back(key, value);
      }
    }
  }
  size_t cursor = 0;
  std::unordered_map<PyObject*, PyObject*> by_key;  // built on the first miss
  auto state_of = [&](PyObject* param) -> PyObject* {
    if (cursor < entries.size() && entries[cursor].first == param) {
      return entries[cursor++].second;
    }
    if (by_key.empty() && !entries.empty()) {
      by_key.insert(entries.begin(), entries.end());
    }
    const auto found = by_key.find(param);
    if (found == by_key.end()) {
      return nullptr;
    }
    // Continue in order from the entry found.
    for (size_t k = 0; k < entries.size(); ++k) {
      if (entries[k].first == param) {
        cursor = k + 1;
        break;
      }
    }
    return found->second;
  };

  auto plan = std::make_unique<StepPlan>();
  std::map<std::tuple<int, int, int, bool>, size_t> bucket_of;   // (device type, index, dtype, amsgrad)
  const int64_t n_groups = static_cast<int64_t>(param_groups.size());
  plan->num_groups = n_groups;
  for (int64_t g = 0; g < n_groups; ++g) {
    PyObject* group = PyList_GET_ITEM(param_groups.ptr(), g);
    if (!PyDict_Check(group)) {
      throw py::type_error("FusedAdamW: param group " + std::to_string(g) + " is not a dict");
    }
    PyObject* params_obj = dict_item(group, kParams);
    PyObject* amsgrad_obj = dict_item(group, kAmsgrad);
    if (params_obj == nullptr) {
      throw py::value_error("FusedAdamW: param group " + std::to_string(g) + " has no 'params'");
    }
    // A list as torch keeps it; a tuple or other sequence someone put there works too.
    const py::object params = py::reinterpret_steal<py::object>(
        PySequence_Fast(params_obj, "FusedAdamW: a param group's 'params' must be a sequence"));
    if (!params) {
      throw py::error_already_set();
    }
    const Py_ssize_t group_size = PySequence_Fast_GET_SIZE(params.ptr());
    for (Bucket& b : plan->buckets) {
      b.reserve_more(static_cast<size_t>(group_size));
    }
    const int amsgrad_truth = amsgrad_obj == nullptr ? 0 : PyObject_IsTrue(amsgrad_obj);
    if (amsgrad_truth < 0) {
      throw py::error_already_set();
    }
    const bool amsgrad = amsgrad_truth == 1;
    const Py_ssize_t count = PySequence_Fast_GET_SIZE(params.ptr());
    for (Py_ssize_t j = 0; j < count; ++j) {
      PyObject* param_obj = PySequence_Fast_GET_ITEM(params.ptr(), j);
      const at::Tensor& param = local_tensor(param_obj, "a parameter");
      const at::Tensor& grad = local_grad(param_obj, param);
      if (!grad.defined()) {
        continue;  // as torch: a parameter whose .grad is None is not stepped
      }
      if (grad.is_sparse() || grad.layout() != at::kStrided) {
        throw std::runtime_error("FusedAdamW does not support sparse gradients (" + param_name(g, j, param) + ")");
      }
      // A complex parameter is updated as its real view, pairs of reals, as
      // torch.optim.AdamW updates it (view_as_real): it joins its real dtype's call.
      const bool complex = at::isComplexType(param.scalar_type());
      const at::ScalarType math_dtype = complex ? c10::toRealValueType(param.scalar_type()) : param.scalar_type();
      if (!is_supported_dtype(math_dtype)) {
        throw py::value_error("FusedAdamW: " + param_name(g, j, param) + " has dtype " +
                              std::string(c10::toString(param.scalar_type())) +
                              "; supported: float32, float64, bfloat16, float16, complex64, complex128");
      }
      PyObject* st = state_of(param_obj);
      if (st == nullptr || PyDict_Size(st) == 0) {
        plan->stateless.emplace_back(g, j);
        continue;
      }
      // The entries, read in one pass over the (small) dict: no hashing, and keys are
      // usually the interned strings themselves (a loaded state dict's are compared).
      PyObject* entries_of_state[4] = {nullptr, nullptr, nullptr, nullptr};
      {
        static PyObject* const kKeys[4] = {kStep, kExpAvg, kExpAvgSq, kMaxExpAvgSq};
        static const char* const kKeyNames[4] = {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"};
        Py_ssize_t pos = 0;
        PyObject *key = nullptr, *value = nullptr;
        while (PyDict_Next(st, &pos, &key, &value)) {
          for (int k = 0; k < 4; ++k) {
            if (key == kKeys[k] ||
                (PyUnicode_Check(key) && PyUnicode_CompareWithASCIIString(key, kKeyNames[k]) == 0)) {
              entries_of_state[k] = value;
              break;
            }
          }
        }
      }
      auto required = [&](int k, const char* name) {
        if (entries_of_state[k] == nullptr) {
          // torch.optim.AdamW fails the same way (a KeyError on the missing entry).
          throw py::key_error("FusedAdamW: the optimizer state of " + param_name(g, j, param) + " has no '" +
                              name + "'");
        }
        return entries_of_state[k];
      };
      PyObject* step_obj = required(0, "step");
      PyObject* exp_avg_obj = required(1, "exp_avg");
      PyObject* exp_avg_sq_obj = required(2, "exp_avg_sq");
      PyObject* max_obj = amsgrad ? required(3, "max_exp_avg_sq") : nullptr;
      const bool step_ok = THPVariable_Check(step_obj) && [&] {
        const at::Tensor& s = THPVariable_Unpack(step_obj);
        return s.scalar_type() == at::kFloat && s.numel() == 1 && s.device() == param.device() &&
               !s.unsafeGetTensorImpl()->is_python_dispatch();
      }();
      if (!step_ok) {
        plan->misplaced_steps.emplace_back(g, j);
        continue;
      }
      const auto key = std::make_tuple(static_cast<int>(param.device().type()),
                                       static_cast<int>(param.device().index()),
                                       static_cast<int>(math_dtype), amsgrad);
      auto slot = bucket_of.find(key);
      if (slot == bucket_of.end()) {
        slot = bucket_of.emplace(key, plan->buckets.size()).first;
        plan->buckets.emplace_back();
        plan->buckets.back().device = param.device();
        plan->buckets.back().dtype = math_dtype;
        plan->buckets.back().amsgrad = amsgrad;
        plan->buckets.back().reserve_more(static_cast<size_t>(count));
      }
      Bucket& b = plan->buckets[slot->second];
      b.rows.push_back(g);
      if (complex) {
        const at::NoGradGuard no_grad;
        // The real views are new tensors: the bucket owns them while it borrows them.
        auto real = [&b](const at::Tensor& t) -> const at::Tensor& {
          b.owned.push_back(t.is_complex() ? at::view_as_real(t) : t);
          return b.owned.back();
        };
        b.params.push_back(real(param));
        b.grads.push_back(real(grad));
        b.exp_avgs.push_back(real(local_tensor(exp_avg_obj, "state['exp_avg']")));
        b.exp_avg_sqs.push_back(real(local_tensor(exp_avg_sq_obj, "state['exp_avg_sq']")));
        if (amsgrad) {
          b.max_exp_avg_sqs.push_back(real(local_tensor(max_obj, "state['max_exp_avg_sq']")));
        }
      } else {
        b.params.push_back(param);
        b.grads.push_back(grad);
        b.exp_avgs.push_back(local_tensor(exp_avg_obj, "state['exp_avg']"));
        b.exp_avg_sqs.push_back(local_tensor(exp_avg_sq_obj, "state['exp_avg_sq']"));
        if (amsgrad) {
          b.max_exp_avg_sqs.push_back(local_tensor(max_obj, "state['max_exp_avg_sq']"));
        }
      }
      b.steps.push_back(THPVariable_Unpack(step_obj));
      b.where.emplace_back(g, j);
      // Checked now, while its tensors are in cache, as one call's row; parameters
      // that share memory (rare) are split into rounds and checked again by check().
      const size_t i = b.params.size() - 1;
      const auto name_of = [&](int64_t) { return param_name(g, j, param); };
      TensorRow row = check_and_make_row(b.params[i], b.grads[i], b.exp_avgs[i], b.exp_avg_sqs[i],
                                         amsgrad ? &b.max_exp_avg_sqs[i] : nullptr, b.steps[i], b.device, b.dtype,
                                         b.rows[i], plan->num_groups,
                                         static_cast<int64_t>(i), name_of);
      row.offset = next_row_offset(b.single_call_total);
      b.single_call_total = row.offset + row.numel;
      b.single_call_rows.push_back(row);
    }
  }
  return plan;
}

// One optimizer step: plans it from param_groups and optimizer.state as they
// are now and, when nothing needs preparing, makes it. Returns None when the
// step was made; otherwise, having changed nothing, (stateless, misplaced_steps,
// devices without a counter) for FusedAdamW to prepare before calling again.
//   hyper:      the optimizer's float64 [groups, columns] table on the CPU
//   device_hypers: {torch.device: the same table on that device} for devices whose
//               kernels should read it there (FusedAdamW keeps them current with
//               stream-ordered copies, which CUDA graph replays see); other devices'
//               calls are given the CPU table
//   counters:   {torch.device: int64 [2] schedule counter}; a counter whose
//               device takes no part in this step is advanced all the same
//   grad_scale, found_inf: torch.amp.GradScaler's tensors or None
//   grad_clip:  the clipping factor (FusedAdamW.clip_grad_norm_) or None
py::object fused_step(py::list param_groups, py::dict state, const at::Tensor& hyper, py::dict counters,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                      const std::optional<at::Tensor>& grad_clip, const std::optional<py::dict>& device_hypers) {
  const std::unique_ptr<StepPlan> plan = collect(param_groups, state);
  const std::vector<at::Device> devices = plan->devices();
  std::vector<at::Tensor> device_counters;
  std::vector<at::Device> missing;
  for (const at::Device& device : devices) {
    PyObject* counter = PyDict_GetItemWithError(counters.ptr(), py::cast(device).ptr());
    if (counter == nullptr) {
      if (PyErr_Occurred()) {
        throw py::error_already_set();
      }
      missing.push_back(device);
    } else {
      device_counters.push_back(THPVariable_Unpack(counter));
    }
  }
  if (!plan->ready() || !missing.empty()) {
    return py::make_tuple(plan->stateless, plan->misplaced_steps, missing);
  }
  // Every device has a counter (so FusedAdamW has checked it has a kernel): check
  // every call of the step, then make them.
  for (Bucket& b : plan->buckets) {
    assign_rounds(b);
  }
  plan->check();
  TORCH_CHECK(hyper.is_cpu() && hyper.size(0) == plan->num_groups, "FusedAdamW: the hyper table must be on the CPU "
              "with a row per param group");
  std::vector<at::Tensor> hypers;
  for (size_t d = 0; d < devices.size(); ++d) {
    PyObject* on_device = device_hypers ? dict_item(device_hypers->ptr(), py::cast(devices[d]).ptr()) : nullptr;
    hypers.push_back(on_device != nullptr ? THPVariable_Unpack(on_device) : hyper);
    TORCH_CHECK(hypers[d].sizes() == hyper.sizes(), "FusedAdamW: the hyper table of ", devices[d],
                " has shape ", hypers[d].sizes(), ", the CPU table ", hyper.sizes());
    check_call_arguments(device_counters[d], hypers[d]);
  }
  std::vector<std::optional<at::Tensor>> scales, infs, clips;
  for (const at::Device& device : devices) {
    auto on_device = [&](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
      if (!t) {
        return std::nullopt;
      }
      return t->to(device, at::kFloat, /*non_blocking=*/true).reshape({1});
    };
    scales.push_back(on_device(grad_scale));
    infs.push_back(on_device(found_inf));
    clips.push_back(grad_clip ? std::optional<at::Tensor>(grad_clip->to(device, at::kDouble, /*non_blocking=*/true)
                                                              .reshape({1}))
                              : std::nullopt);
    check_scaler_tensors(scales.back(), infs.back(), device, clips.back());
  }
  plan->run(hypers, device_counters, scales, infs, clips);
  // The schedule counts optimizer steps: devices that took no part advance too.
  Py_ssize_t pos = 0;
  PyObject *key = nullptr, *value = nullptr;
  while (PyDict_Next(counters.ptr(), &pos, &key, &value)) {
    const at::Tensor& counter = THPVariable_Unpack(value);
    if (std::find(devices.begin(), devices.end(), counter.device()) == devices.end()) {
      counter.narrow(0, 0, 1).add_(1);
    }
  }
  return py::none();
}

}  // namespace
}  // namespace noam_ext

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "noam_ext's compiled ops; importing it registers torch.ops.noam_ext.*";
  m.attr("compiled_cpu_capabilities") = noam_ext::cpu::compiled_cpu_capabilities();
  m.attr("cpu_op_parallel") = noam_ext::cpu::op_is_parallel();
#if defined(NOAM_EXT_WITH_CUDA)
  m.attr("cuda_compiled") = 1;
#else
  m.attr("cuda_compiled") = 0;
#endif
  m.def("cpu_capability", [] { return noam_ext::cpu::active_cpu_capability(); },
        "Instruction set the CPU op runs with: default, avx2 or avx512.");
  m.def("fused_step", &noam_ext::fused_step, py::arg("param_groups"), py::arg("state"), py::arg("hyper"),
        py::arg("counters"), py::arg("grad_scale"), py::arg("found_inf"), py::arg("grad_clip") = py::none(),
        py::arg("device_hypers") = py::none(),
        "FusedAdamW.step()'s work: reads param_groups, every p.grad and optimizer.state as they are now, "
        "checks everything, then calls the op once per (device, dtype, amsgrad), more where parameters share "
        "memory. Returns None, or what must be prepared first (nothing is changed then).");
}

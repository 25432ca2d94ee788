// Planning one FusedAdamW step from param_groups and optimizer.state as they are
// now (python_module.cpp): for every parameter, in order, read it where torch keeps
// it, check it, and plan it into its bucket with a checked row. Nothing is written.
#pragma once

#include <torch/extension.h>

#include <map>
#include <memory>
#include <string>
#include <tuple>

#include "noam_ext/op_checks.h"
#include "noam_ext/rounding_streams.h"
#include "step/step_plan.h"
#include "step/torch_objects.h"

namespace noam_ext::step {

// One param group as the step reads it.
struct GroupView {
  py::object params;   // a fast sequence (a list as torch keeps it; a tuple works too)
  Py_ssize_t size = 0;
  bool amsgrad = false;
  MasterKind master = MasterKind::kNone;   // group["master_weights"]: None, "float32", "remainder"
  bool quantized = false;                  // group["moment_dtype"] == "8bit": 8-bit moments in the state
  bool stochastic_rounding = false;        // group["stochastic_rounding"]
  uint64_t seed = 0;                       // group["seed"], stochastic rounding's seed
};

// A group's truthy option (absent: false).
inline bool group_flag(PyObject* group, PyObject* key) {
  PyObject* value = dict_item(group, key);
  const int truth = value == nullptr ? 0 : PyObject_IsTrue(value);
  if (truth < 0) {
    throw py::error_already_set();
  }
  return truth == 1;
}

inline MasterKind group_master(PyObject* group, int64_t g) {
  static PyObject* const kMasterWeights = PyUnicode_InternFromString("master_weights");
  PyObject* value = dict_item(group, kMasterWeights);
  if (value == nullptr || value == Py_None) {
    return MasterKind::kNone;
  }
  if (PyUnicode_Check(value) && PyUnicode_CompareWithASCIIString(value, "float32") == 0) {
    return MasterKind::kFloat32;
  }
  if (PyUnicode_Check(value) && PyUnicode_CompareWithASCIIString(value, "remainder") == 0) {
    return MasterKind::kRemainder;
  }
  throw py::value_error("FusedAdamW: param group " + std::to_string(g) +
                        " has master_weights other than None, 'float32' or 'remainder'");
}

inline GroupView read_group(PyObject* group, int64_t g) {
  static PyObject* const kParams = PyUnicode_InternFromString("params");
  static PyObject* const kAmsgrad = PyUnicode_InternFromString("amsgrad");
  static PyObject* const kStochasticRounding = PyUnicode_InternFromString("stochastic_rounding");
  static PyObject* const kSeed = PyUnicode_InternFromString("seed");
  if (!PyDict_Check(group)) {
    throw py::type_error("FusedAdamW: param group " + std::to_string(g) + " is not a dict");
  }
  PyObject* params = dict_item(group, kParams);
  if (params == nullptr) {
    throw py::value_error("FusedAdamW: param group " + std::to_string(g) + " has no 'params'");
  }
  GroupView view;
  view.params = py::reinterpret_steal<py::object>(
      PySequence_Fast(params, "FusedAdamW: a param group's 'params' must be a sequence"));
  if (!view.params) {
    throw py::error_already_set();
  }
  view.size = PySequence_Fast_GET_SIZE(view.params.ptr());
  PyObject* amsgrad = dict_item(group, kAmsgrad);
  const int truth = amsgrad == nullptr ? 0 : PyObject_IsTrue(amsgrad);
  if (truth < 0) {
    throw py::error_already_set();
  }
  view.amsgrad = truth == 1;
  view.master = group_master(group, g);
  static PyObject* const kMomentDtype = PyUnicode_InternFromString("moment_dtype");
  PyObject* moment_dtype = dict_item(group, kMomentDtype);
  view.quantized = moment_dtype != nullptr && PyUnicode_Check(moment_dtype) &&
                   PyUnicode_CompareWithASCIIString(moment_dtype, "8bit") == 0;
  view.stochastic_rounding = group_flag(group, kStochasticRounding);
  if (view.stochastic_rounding) {
    PyObject* seed = dict_item(group, kSeed);
    view.seed = seed == nullptr || seed == Py_None ? 0 : PyLong_AsUnsignedLongLongMask(seed);
    if (PyErr_Occurred()) {
      throw py::error_already_set();
    }
  }
  return view;
}

// One parameter and its gradient as the step reads them (local shards of DTensors).
struct ParamView {
  int64_t group = 0;
  int64_t index = 0;
  PyObject* object = nullptr;
  const at::Tensor* param = nullptr;
  const at::Tensor* grad = nullptr;          // undefined: the parameter has no gradient
  at::ScalarType math_dtype = at::kFloat;    // a complex parameter's real dtype
  bool complex = false;
  bool sharded = false;                      // a DTensor: the step updates its local shard
  std::string name() const { return param_name(group, index, *param); }
};

inline ParamView read_param(const GroupView& group, int64_t g, Py_ssize_t j) {
  ParamView p;
  p.group = g;
  p.index = j;
  p.object = PySequence_Fast_GET_ITEM(group.params.ptr(), j);
  p.param = &local_tensor(p.object, "a parameter");
  p.sharded = p.param != &THPVariable_Unpack(p.object);
  p.grad = &local_grad(p.object, *p.param);
  // A complex parameter is updated as its real view, pairs of reals, as
  // torch.optim.AdamW updates it (view_as_real): it joins its real dtype's call.
  p.complex = at::isComplexType(p.param->scalar_type());
  p.math_dtype = p.complex ? c10::toRealValueType(p.param->scalar_type()) : p.param->scalar_type();
  return p;
}

// What torch refuses before looking at the state, with its message: a sparse gradient.
// (Everything else about the tensors is the op's to check: op_checks.h.)
inline void check_param(const ParamView& p) {
  if (p.grad->is_sparse() || p.grad->layout() != at::kStrided) {
    throw std::runtime_error("FusedAdamW does not support sparse gradients (" + p.name() + ")");
  }
}

// The state entries a parameter's step reads; `ready` is false when its step
// counter must be moved to the parameter's device first (a torch.optim.AdamW
// checkpoint keeps it on the CPU). `master` is the master entry its group needs
// (null when it needs none, or when it has none yet: `has_master` tells).
struct StateView {
  StateEntries entries;
  PyObject* master = nullptr;
  bool ready = false;
  bool has_master = true;
  bool quantized = false;   // 8-bit moments: its group's, unless its state keeps float moments (below)
};

inline StateView read_state(const ParamView& p, PyObject* state, const GroupView& group) {
  StateView s;
  s.entries = read_state_entries(state);
  auto require = [&](PyObject* entry, const char* key) {
    if (entry == nullptr) {
      // torch.optim.AdamW fails the same way (a KeyError on the missing entry).
      throw py::key_error("FusedAdamW: the optimizer state of " + p.name() + " has no '" + key + "'" +
                          (group.quantized ? " (its param group has moment_dtype='8bit'; load_state_dict converts "
                                             "other moments)"
                                           : ""));
    }
  };
  require(s.entries.step, "step");
  const int moments = group.amsgrad ? 3 : 2;
  // In an 8-bit group, a DTensor parameter whose state holds float moments and no codes keeps
  // them: FusedAdamW makes such state for a shard whose blocks cannot follow its sharding
  // (noam_ext/_storage.py, eight_bit_for; docs/eight_bit_state.md, "Blocks and shards"). Any
  // other parameter must have codes (a missing one is the KeyError below).
  s.quantized = group.quantized &&
                !(p.sharded && s.entries.quantized[0][0] == nullptr && s.entries.exp_avg != nullptr);
  if (s.quantized) {
    for (int k = 0; k < moments; ++k) {
      require(s.entries.quantized[k][0], kQuantizedStateKeys[k][0]);
      require(s.entries.quantized[k][1], kQuantizedStateKeys[k][1]);
    }
    // The step reads the codes where the moments are (their dtype, uint8, tells the op).
    s.entries.exp_avg = s.entries.quantized[0][0];
    s.entries.exp_avg_sq = s.entries.quantized[1][0];
    s.entries.max_exp_avg_sq = s.entries.quantized[2][0];
  }
  require(s.entries.exp_avg, "exp_avg");
  require(s.entries.exp_avg_sq, "exp_avg_sq");
  if (group.amsgrad) {
    require(s.entries.max_exp_avg_sq, "max_exp_avg_sq");
  }
  const MasterKind master = group.master;
  if (master != MasterKind::kNone) {
    s.master = master == MasterKind::kFloat32 ? s.entries.master_param : s.entries.master_remainder;
    s.has_master = s.master != nullptr;
  }
  s.ready = is_tensor(s.entries.step) && [&] {
    const at::Tensor& step = THPVariable_Unpack(s.entries.step);
    return step.scalar_type() == at::kFloat && step.numel() == 1 && step.device() == p.param->device() &&
           !step.unsafeGetTensorImpl()->is_python_dispatch();
  }();
  return s;
}

// Adds a read and checked parameter to its bucket: its tensors (real views of
// complex ones, owned by the bucket), and its row, checked now while its tensors
// are in cache, as a row of the bucket's single call. Parameters that share memory
// (rare) are split into rounds and checked again by StepPlan::check().
using BucketKey = std::tuple<int, int, int, int, int, int, bool, bool>;

// Which bucket each key (device type and index, storage dtypes, master, amsgrad,
// rounding) fills. Parameters come in runs of one bucket: the last one found is
// looked at first.
class BucketIndex {
 public:
  std::optional<size_t> find(const BucketKey& key) {
    if (last_ != index_.end() && last_->first == key) {
      return last_->second;
    }
    const auto found = index_.find(key);
    if (found == index_.end()) {
      return std::nullopt;
    }
    last_ = found;
    return found->second;
  }
  void add(const BucketKey& key, size_t bucket) { last_ = index_.emplace(key, bucket).first; }

 private:
  std::map<BucketKey, size_t> index_;
  std::map<BucketKey, size_t>::iterator last_ = index_.end();
};

// Where a shard's elements lie in its whole parameter, for stochastic rounding: (offset
// of element 0, salt), as FusedAdamW worked it out in Python before the step
// (noam_ext._storage.shard_rounding) and passes it in `shards`, keyed by the parameter;
// nullopt when it has not yet (collect then reports the parameter for preparation).
inline std::optional<std::pair<int64_t, uint64_t>> shard_rounding(PyObject* shards, PyObject* param) {
  PyObject* entry = shards != nullptr ? dict_item(shards, param) : nullptr;
  if (entry == nullptr) {
    return std::nullopt;
  }
  return py::reinterpret_borrow<py::object>(entry).cast<std::pair<int64_t, uint64_t>>();
}

inline void plan_param(StepPlan& plan, BucketIndex& bucket_of, const ParamView& p,
                       const StateView& s, const GroupView& group, const std::pair<int64_t, uint64_t>& shard) {
  const at::Device device = p.param->device();
  const at::Tensor& exp_avg = local_tensor(s.entries.exp_avg, "state['exp_avg']");
  const at::Tensor* master = s.master != nullptr ? &local_tensor(s.master, "the master in the state") : nullptr;
  // What the tensors are stored in, as they are (a complex parameter's as its real view);
  // the kind of master is the group's, and check_and_make_row holds the master to it.
  StorageTypes storage = storage_of(*p.param, *p.grad, exp_avg, nullptr);
  storage.master = group.master;
  storage.param = p.math_dtype;
  storage.grad = p.grad->is_complex() ? c10::toRealValueType(storage.grad) : storage.grad;
  storage.moment = exp_avg.is_complex() ? c10::toRealValueType(storage.moment) : storage.moment;
  const BucketKey key{static_cast<int>(device.type()), static_cast<int>(device.index()),
                      static_cast<int>(storage.param), static_cast<int>(storage.grad),
                      static_cast<int>(storage.moment), static_cast<int>(storage.master), group.amsgrad,
                      group.stochastic_rounding};
  std::optional<size_t> slot = bucket_of.find(key);
  if (!slot) {
    check_storage(storage, group.stochastic_rounding, "FusedAdamW: " + p.name());
    slot = plan.buckets.size();
    bucket_of.add(key, *slot);
    plan.buckets.emplace_back();
    Bucket& fresh = plan.buckets.back();
    fresh.device = device;
    fresh.dtype = storage.param;
    fresh.storage = storage;
    fresh.amsgrad = group.amsgrad;
    fresh.stochastic_rounding = group.stochastic_rounding;
    fresh.reserve_more(static_cast<size_t>(group.size));
  }
  Bucket& b = plan.buckets[*slot];
  const bool amsgrad = group.amsgrad;
  b.rows.push_back(p.group);
  auto add = [&](BorrowedTensors& list, const at::Tensor& t) {
    if (!p.complex) {
      list.push_back(t);
      return;
    }
    const at::NoGradGuard no_grad;
    // The real views are new tensors: the bucket owns them while it borrows them.
    b.owned.push_back(t.is_complex() ? at::view_as_real(t) : t);
    list.push_back(b.owned.back());
  };
  add(b.params, *p.param);
  add(b.grads, *p.grad);
  add(b.exp_avgs, exp_avg);
  add(b.exp_avg_sqs, local_tensor(s.entries.exp_avg_sq, "state['exp_avg_sq']"));
  if (amsgrad) {
    add(b.max_exp_avg_sqs, local_tensor(s.entries.max_exp_avg_sq, "state['max_exp_avg_sq']"));
  }
  if (master != nullptr) {
    b.masters.push_back(*master);   // a real tensor: a complex parameter has no master (FusedAdamW refuses it)
  }
  const int scales = s.quantized ? (amsgrad ? 3 : 2) : 0;   // real tensors: FusedAdamW refuses complex ones
  for (int k = 0; k < scales; ++k) {
    b.moment_absmax.push_back(local_tensor(s.entries.quantized[k][1], kQuantizedStateKeys[k][1]));
  }
  b.steps.push_back(THPVariable_Unpack(s.entries.step));
  b.where.emplace_back(p.group, p.index);
  const size_t i = b.params.size() - 1;
  const auto name_of = [&](int64_t) { return p.name(); };
  RowTensors tensors{b.params[i], b.grads[i], b.exp_avgs[i], b.exp_avg_sqs[i],
                     amsgrad ? &b.max_exp_avg_sqs[i] : nullptr, master != nullptr ? &b.masters[i] : nullptr,
                     b.steps[i]};
  for (int k = 0; k < scales; ++k) {
    tensors.absmax[k] = &b.moment_absmax[i * scales + k];
  }
  TensorRow row = check_and_make_row(tensors, b.device, b.storage, b.rows[i], plan.num_groups,
                                     static_cast<int64_t>(i), name_of, b.single_call_layouts);
  if (group.stochastic_rounding) {
    const auto [offset, salt] = shard;   // (0, 0) but for a shard (DTensor)
    const uint64_t stream = param_rounding_stream(group.seed, p.group, p.index, salt);
    row.rng_stream = stream;
    row.element_offset = offset;
    b.rng_streams.push_back(static_cast<int64_t>(stream));
    b.element_offsets.push_back(offset);
  }
  row.offset = next_row_offset(b.single_call_total, row_alignment(b.storage));
  b.single_call_total = row.offset + row.numel;
  b.single_call_rows.push_back(row);
}

// Reads param_groups and optimizer.state as they are now and plans the step:
// read -> check -> plan, parameter by parameter, in order.
inline std::unique_ptr<StepPlan> collect(py::list param_groups, py::dict state, PyObject* shards = nullptr) {
  StateIndex states(state.ptr());
  auto plan = std::make_unique<StepPlan>();
  BucketIndex bucket_of;
  plan->num_groups = static_cast<int64_t>(param_groups.size());
  for (int64_t g = 0; g < plan->num_groups; ++g) {
    const GroupView group = read_group(PyList_GET_ITEM(param_groups.ptr(), g), g);
    for (Bucket& b : plan->buckets) {
      b.reserve_more(static_cast<size_t>(group.size));
    }
    for (Py_ssize_t j = 0; j < group.size; ++j) {
      const ParamView p = read_param(group, g, j);
      if (!p.grad->defined()) {
        continue;  // as torch: a parameter whose .grad is None is not stepped
      }
      check_param(p);
      std::optional<std::pair<int64_t, uint64_t>> shard = std::make_pair(int64_t{0}, uint64_t{0});
      if (group.stochastic_rounding && THPVariable_Unpack(p.object).unsafeGetTensorImpl()->is_python_dispatch()) {
        shard = shard_rounding(shards, p.object);   // a shard (DTensor): where its elements lie
      }
      PyObject* st = states.find(p.object);
      if (st == nullptr || PyDict_Size(st) == 0) {
        plan->stateless.emplace_back(g, j);   // FusedAdamW creates it, as torch does lazily
        if (!shard) {
          plan->unplaced_shards.emplace_back(g, j);
        }
        plan->unplanned_devices.push_back(p.param->device());
        continue;
      }
      const StateView s = read_state(p, st, group);
      if (!s.ready || !s.has_master || !shard) {   // all reported: one preparation mends them all
        if (!s.ready) {
          plan->misplaced_steps.emplace_back(g, j);
        }
        if (!s.has_master) {
          plan->masterless.emplace_back(g, j);
        }
        if (!shard) {
          plan->unplaced_shards.emplace_back(g, j);
        }
        plan->unplanned_devices.push_back(p.param->device());
        continue;
      }
      plan_param(*plan, bucket_of, p, s, group, *shard);
    }
  }
  return plan;
}

}  // namespace noam_ext::step

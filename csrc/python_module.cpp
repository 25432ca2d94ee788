// The noam_ext._C Python module (pybind11): importing it loads the library,
// which registers the ops (ops.cpp and the per-device files). Besides build
// facts it holds FusedAdamW.step()'s hot path, which would cost about half a
// microsecond of Python per parameter: reading every parameter's gradient and
// optimizer state where torch keeps them (param_groups, p.grad, optimizer.state),
// checking them, and calling the op once per (device, dtype, amsgrad). The reading
// and planning live in step/ (torch_objects.h, collect.h, step_plan.h).
//
// Every C++ exception becomes a Python exception (pybind11 translates them); no
// function here changes anything before all its checks have passed.
#include <torch/extension.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/cpu_capability.h"
#include "noam_ext/op_checks.h"
#include "noam_ext/run_rows.h"
#include "python_bit_tricks.h"
#include "python_quantization.h"
#include "step/collect.h"
#include "step/step_plan.h"

namespace py = pybind11;

namespace noam_ext {
namespace {

using step::Bucket;
using step::dict_item;
using step::StepPlan;

// One optimizer step: plans it from param_groups and optimizer.state as they
// are now and, when nothing needs preparing, makes it. Returns None when the
// step was made; otherwise, having changed nothing, everything to prepare, for every
// parameter at once: (stateless, misplaced_steps, devices without a counter,
// masterless, unplaced_shards). After FusedAdamW has prepared all of it, the next call
// makes the step.
//   shards:     {DTensor parameter: (offset, salt)} of stochastically rounded groups
//               (noam_ext._storage.shard_rounding, worked out in Python)
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
                      const std::optional<at::Tensor>& grad_clip, const std::optional<py::dict>& device_hypers,
                      const std::optional<py::dict>& shards) {
  const std::unique_ptr<step::StepPlan> plan = step::collect(param_groups, state, shards ? shards->ptr() : nullptr);
  const std::vector<at::Device> devices = plan->devices();
  auto counter_of = [&](const at::Device& device) {
    PyObject* counter = PyDict_GetItemWithError(counters.ptr(), py::cast(device).ptr());
    if (counter == nullptr && PyErr_Occurred()) {
      throw py::error_already_set();
    }
    return counter;
  };
  std::vector<at::Device> missing;
  for (const at::Device& device : plan->devices_with_parameters()) {
    if (counter_of(device) == nullptr) {
      missing.push_back(device);
    }
  }
  if (!plan->ready() || !missing.empty()) {
    return py::make_tuple(plan->stateless, plan->misplaced_steps, missing, plan->masterless, plan->unplaced_shards);
  }
  std::vector<at::Tensor> device_counters;
  for (const at::Device& device : devices) {
    device_counters.push_back(THPVariable_Unpack(counter_of(device)));
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
      counter.add_(1);
    }
  }
  return py::none();
}

// The op calls step() would make now, without making them, for tests that compare the
// eager step's bucketing with the compiled step's (noam_ext/optimizer.py,
// _traceable_calls): per call, its device, storage, amsgrad, stochastic rounding, and
// per parameter its (group, index), hyper row, rounding stream and element offset.
py::list planned_calls(py::list param_groups, py::dict state, py::dict shards) {
  const std::unique_ptr<step::StepPlan> plan = step::collect(param_groups, state, shards.ptr());
  TORCH_CHECK(plan->ready(), "planned_calls: some parameters have no state, steps to move or no masters yet: "
              "take a step first");
  const auto name = noam_ext::storage_dtype_name;
  py::list out;
  for (Bucket& b : plan->buckets) {
    assign_rounds(b);
    for (int32_t round = 0; round < b.num_rounds; ++round) {
      const step::CallLists c = step::round_lists(b, round);
      py::dict call;
      call["device"] = py::cast(b.device);
      call["storage"] = py::make_tuple(name(b.storage.param), name(b.storage.grad), name(b.storage.moment),
                                       noam_ext::storage_master_name(b.storage.master));
      call["amsgrad"] = b.amsgrad;
      call["stochastic_rounding"] = b.stochastic_rounding;
      call["where"] = c.where;
      call["groups"] = c.rows;
      call["rng_streams"] = c.rng_streams;
      call["element_offsets"] = c.element_offsets;
      out.append(call);
    }
  }
  return out;
}

}  // namespace
}  // namespace noam_ext

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "noam_ext's compiled ops; importing it registers torch.ops.noam_ext.*";
  m.attr("compiled_cpu_capabilities") = noam_ext::cpu::compiled_cpu_capabilities();
  m.attr("cpu_op_parallel") = noam_ext::cpu::op_is_parallel();
#if defined(NOAM_EXT_WITH_CUDA)
  m.attr("cuda_compiled") = 1;
  m.def("cuda_table_cache_stats", &noam_ext::cuda::table_cache_stats,
        "For tests: [device tables cached, tables that live CUDA graphs hold].");
  m.def(
      "cuda_launch_pointers",
      [] {
        std::vector<std::tuple<int, bool, std::string, uintptr_t, uintptr_t>> out;
        for (const noam_ext::cuda::LaunchPointers& p : noam_ext::cuda::launch_pointers()) {
          out.emplace_back(p.storage, p.amsgrad, p.launch, reinterpret_cast<uintptr_t>(p.launched),
                           reinterpret_cast<uintptr_t>(p.stub));
        }
        return out;
      },
      "For tests: (storage index, amsgrad, launch, address run_rows would launch, nvcc's stub of that kernel) "
      "for every kernel (csrc/noam_ext/run_rows.h).");
#else
  m.attr("cuda_compiled") = 0;
#endif
  m.def(
      "supported_storage",
      [] {
        using noam_ext::storage_dtype_name;
        std::vector<std::tuple<std::string, std::string, std::string, std::string>> out;
        for (const noam_ext::StorageTypes& s : noam_ext::kSupportedStorage) {
          out.emplace_back(storage_dtype_name(s.param), storage_dtype_name(s.grad), storage_dtype_name(s.moment),
                           noam_ext::storage_master_name(s.master));
        }
        return out;
      },
      "The (param, grad, moment, master) storage combinations the op supports (csrc/noam_ext/storage.h).");
  m.def(
      "storage_problem",
      [](const std::string& param, const std::string& grad, const std::string& moment, const std::string& master,
         bool stochastic_rounding) {
        return noam_ext::storage_problem(noam_ext::storage_named(param, grad, moment, master), stochastic_rounding);
      },
      py::arg("param"), py::arg("grad"), py::arg("moment"), py::arg("master"), py::arg("stochastic_rounding"),
      "Why the op cannot store a parameter so (dtype names as supported_storage() gives them), or '' when it "
      "can: the op's own check (csrc/noam_ext/op_checks.h, storage_problem), for FusedAdamW's constructor.");
  m.def("remainders_of_masters", &noam_ext::python::remainders_of_masters, py::arg("masters"),
        "The int16 remainders of float32 masters (CPU), as the op splits a master (adamw_math.h).");
  m.def("masters_of_remainders", &noam_ext::python::masters_of_remainders, py::arg("params"),
        py::arg("remainders"), "The float32 masters of bfloat16 parameters and their int16 remainders (CPU).");
  m.def("quantization_map", &noam_ext::python::quantization_map, py::arg("signed"),
        "The 256 float32 values of 8-bit moments' map: signed (exp_avg) or unsigned (exp_avg_sq), "
        "the dynamic maps of bitsandbytes (within 2 ulps; csrc/noam_ext/quantization.h).");
  m.def("quantize_blocks", &noam_ext::python::quantize_blocks, py::arg("values"), py::arg("signed"),
        "(codes, scales) of a 1-D float32 CPU tensor, as the op stores 8-bit moments (quantization.h).");
  m.def("dequantize_blocks", &noam_ext::python::dequantize_blocks, py::arg("codes"), py::arg("scales"),
        py::arg("signed"), "The float32 moments that 1-D codes and their scales decode to.");
  m.def(
      "walk_order",
      [](std::vector<int64_t> sizes, std::vector<int64_t> strides) {
        // A tensor of no storage with the parameter's layout, for the op's own rule.
        const at::Tensor layout = at::empty_strided(sizes, strides, at::TensorOptions().device(at::kMeta));
        const bool in_memory_order = noam_ext::walked_in_memory_order(layout);
        const auto order = noam_ext::walk_order(layout, in_memory_order);
        std::vector<int64_t> out{in_memory_order ? 1 : 0};
        out.insert(out.end(), order.begin(), order.end());
        return out;
      },
      py::arg("sizes"), py::arg("strides"),
      "[1 if in its memory order else 0, then its dimensions outermost first]: how the op walks the "
      "elements of a parameter of these sizes and strides (csrc/noam_ext/op_checks.h), which 8-bit "
      "moments' blocks follow.");
  m.def("rounding_stream", &noam_ext::python::rounding_stream_argument, py::arg("seed"), py::arg("group"),
        py::arg("index"), py::arg("salt") = 0,
        "Stochastic rounding's stream of parameter `index` of param group `group` as the op's int64 argument "
        "(csrc/noam_ext/rounding_streams.h); salt: a shard's (shard_salt), 0 for none.");
  m.def("shard_salt", &noam_ext::shard_salt, py::arg("global_offsets"),
        "The salt of a shard whose elements are not a run of its whole parameter's, from its global offsets.");
  m.def(
      "table_layout",
      [] {
        auto named = [](const auto& table) {
          py::dict out;
          for (const noam_ext::NamedIndex& entry : table) {
            out[entry.name] = entry.index;
          }
          return out;
        };
        py::list shapes(std::size(noam_ext::kDecayShapeNames));
        for (const noam_ext::NamedIndex& entry : noam_ext::kDecayShapeNames) {
          shapes[static_cast<size_t>(entry.index)] = entry.name;   // the list index is the shape's
        }
        py::dict layout;
        layout["hyper_columns"] = named(noam_ext::kHyperColumnNames);
        layout["num_hyper_columns"] = static_cast<int>(noam_ext::kNumHyperColumns);
        layout["schedule_columns"] = named(noam_ext::kScheduleColumnNames);
        layout["num_schedule_columns"] = static_cast<int>(noam_ext::kNumScheduleColumns);
        layout["schedule_kinds"] = named(noam_ext::kScheduleKindNames);
        layout["decay_shapes"] = shapes;
        py::dict masters;   // master_weights option -> (its state key, its dtype)
        for (const auto kind : {noam_ext::MasterKind::kFloat32, noam_ext::MasterKind::kRemainder}) {
          masters[noam_ext::storage_master_name(kind)] =
              py::make_tuple(noam_ext::kMasterStateKeys[static_cast<int>(kind)],
                             kind == noam_ext::MasterKind::kRemainder ? "int16" : "float32");
        }
        layout["master_state"] = masters;
        // per moment (exp_avg, exp_avg_sq, max_exp_avg_sq): its codes' key, its scales', whether its
        // map is the signed one, and the code of 0.0 in that map
        py::list quantized;
        for (int k = 0; k < 3; ++k) {
          const bool is_signed = noam_ext::kQuantizedSigned[k];
          quantized.append(py::make_tuple(noam_ext::kQuantizedStateKeys[k][0], noam_ext::kQuantizedStateKeys[k][1],
                                          is_signed,
                                          is_signed ? noam_ext::kSignedZeroCode : noam_ext::kUnsignedZeroCode));
        }
        layout["quantized_state"] = quantized;
        layout["quantized_block"] = static_cast<int>(noam_ext::kQuantBlock);
        return layout;
      },
      "The op's hyperparameter table: column indices, schedule kinds and decay shapes by name "
      "(csrc/noam_ext/adamw_math.h, schedule_math.h).");
  m.def("cpu_capability", [] { return noam_ext::cpu::active_cpu_capability(); },
        "Instruction set the CPU op runs with: default, avx2 or avx512.");
  m.def("planned_calls", &noam_ext::planned_calls, py::arg("param_groups"), py::arg("state"), py::arg("shards"),
        "For tests: the op calls step() would make now (device, storage, amsgrad, stochastic_rounding, and per "
        "parameter where, groups, rng_streams, element_offsets), without making them.");
  m.def("fused_step", &noam_ext::fused_step, py::arg("param_groups"), py::arg("state"), py::arg("hyper"),
        py::arg("counters"), py::arg("grad_scale"), py::arg("found_inf"), py::arg("grad_clip") = py::none(),
        py::arg("device_hypers") = py::none(), py::arg("shards") = py::none(),
        "FusedAdamW.step()'s work: reads param_groups, every p.grad and optimizer.state as they are now, "
        "checks everything, then calls the op once per (device, dtype, amsgrad), more where parameters share "
        "memory. Returns None, or what must be prepared first (nothing is changed then).");
}

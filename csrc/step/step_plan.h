// The plan of one FusedAdamW step (python_module.cpp): the parameters that take
// part, grouped into buckets of one (device, dtype, amsgrad) each, the op calls
// each bucket makes (more than one where parameters share memory), and running
// them once every call has been checked.
#pragma once

#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/extension.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "noam_ext/op_checks.h"
#include "noam_ext/run_rows.h"
#include "step/torch_objects.h"

namespace noam_ext::step {

// Everything of one (device, storage, amsgrad, rounding) that takes part in this step.
struct Bucket {
  // Declared first, destroyed last: tensors made for this step (real views of
  // complex tensors) that the lists below borrow.
  std::vector<at::Tensor> owned;
  at::Device device{at::kCPU};
  at::ScalarType dtype{at::kFloat};   // storage.param
  StorageTypes storage{at::kFloat, at::kFloat, at::kFloat, MasterKind::kNone};
  bool amsgrad = false;
  bool stochastic_rounding = false;
  BorrowedTensors params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps;
  BorrowedTensors moment_absmax;      // 8-bit moments: 2 (3 with amsgrad) scale tensors per param
  std::vector<int64_t> rng_streams, element_offsets;   // per param, with stochastic rounding
  std::vector<int64_t> rows;          // per param: its param group (its row of the hyper table)
  std::vector<std::pair<int64_t, int64_t>> where;   // per param: (group, index in group)
  std::vector<int32_t> rounds;        // per param: which of the bucket's calls updates it
  int32_t num_rounds = 1;
  void reserve_more(size_t n) {
    for (BorrowedTensors* list : {&params, &grads, &exp_avgs, &exp_avg_sqs, &max_exp_avg_sqs, &masters, &steps,
                                  &moment_absmax}) {
      list->reserve(list->size() + n);
    }
    rows.reserve(rows.size() + n);
    where.reserve(where.size() + n);
    single_call_rows.reserve(single_call_rows.size() + n);
  }
  // Rows of the whole bucket as one call, checked as collected, and their strided layouts.
  std::vector<TensorRow> single_call_rows;
  std::vector<StridedLayout> single_call_layouts;
  int64_t single_call_total = 0;
  // Filled by StepPlan::check(): per round, the checked rows, their layouts and virtual length.
  std::vector<std::vector<TensorRow>> call_rows;
  std::vector<std::vector<StridedLayout>> call_layouts;
  std::vector<int64_t> call_totals;
};

// Parameters that share memory (weights tied through .data, the same parameter
// twice) must be updated one after the other, as torch.optim.AdamW's loop does:
// each gets a round, one more than the latest earlier parameter it overlaps,
// and each round is a call of its own.
// The spans come from the rows collect checked (their pointers and extents).
inline void assign_rounds(Bucket& b) {
  const int64_t n = static_cast<int64_t>(b.params.size());
  b.rounds.assign(n, 0);
  b.num_rounds = 1;
  thread_local std::vector<std::tuple<uintptr_t, uintptr_t, int64_t>> spans;  // [start, end), position
  spans.clear();   // a reused buffer: no allocation per step
  spans.reserve(n);
  const int64_t element_size = static_cast<int64_t>(c10::elementSize(b.dtype));
  for (int64_t i = 0; i < n; ++i) {
    const TensorRow& row = b.single_call_rows[i];
    if (row.numel > 0) {
      const auto start = reinterpret_cast<uintptr_t>(row.param);
      spans.emplace_back(start, start + row_param_extent(row, b.single_call_layouts) * element_size, i);
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
  BorrowedTensors params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps, moment_absmax;
  std::vector<int64_t> rng_streams, element_offsets;
  std::vector<int64_t> rows;
  std::vector<std::pair<int64_t, int64_t>> where;
};

inline CallLists round_lists(const Bucket& b, int32_t round) {
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
    if (b.storage.master != MasterKind::kNone) {
      c.masters.push_back(b.masters[i]);
    }
    if (b.storage.quantized()) {
      const size_t scales = b.amsgrad ? 3 : 2;
      for (size_t k = 0; k < scales; ++k) {
        c.moment_absmax.push_back(b.moment_absmax[i * scales + k]);
      }
    }
    if (b.stochastic_rounding) {
      c.rng_streams.push_back(b.rng_streams[i]);
      c.element_offsets.push_back(b.element_offsets[i]);
    }
    c.steps.push_back(b.steps[i]);
    c.rows.push_back(b.rows[i]);
    c.where.push_back(b.where[i]);
  }
  return c;
}

class StepPlan {
 public:
  // What FusedAdamW must prepare before the step, every problem of every parameter
  // (collect reports them all at once, so that one preparation and one more collection
  // always suffice), as (group, index):
  // parameters with a gradient but no optimizer state yet (FusedAdamW creates it, as
  // torch does lazily);
  std::vector<std::pair<int64_t, int64_t>> stateless;
  // parameters whose state["step"] is not a one-element float32 tensor on the
  // parameter's device (a torch.optim.AdamW checkpoint keeps it on the CPU): moved there;
  std::vector<std::pair<int64_t, int64_t>> misplaced_steps;
  // parameters of master-weight groups whose state has no master yet (a checkpoint of
  // torch.optim.AdamW, or of an optimizer without the option): made from the parameter.
  std::vector<std::pair<int64_t, int64_t>> masterless;
  // DTensor parameters of stochastically rounded groups whose place in the whole
  // parameter FusedAdamW has not worked out yet (noam_ext._storage.shard_rounding).
  std::vector<std::pair<int64_t, int64_t>> unplaced_shards;
  // The devices of those parameters: their schedule counters are checked with the
  // planned buckets' (devices_with_parameters), so that a first step asks for them too.
  std::vector<at::Device> unplanned_devices;
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

  // Every device with a parameter to step: the buckets' and the unplanned parameters'.
  std::vector<at::Device> devices_with_parameters() const {
    std::vector<at::Device> out = devices();
    for (const at::Device& d : unplanned_devices) {
      if (std::find(out.begin(), out.end(), d) == out.end()) {
        out.push_back(d);
      }
    }
    return out;
  }

  bool ready() const {
    return stateless.empty() && misplaced_steps.empty() && masterless.empty() && unplaced_shards.empty();
  }

  // Checks every call this plan will make, naming parameters, before any is
  // made, and keeps each call's rows for run().
  void check() {
    for (Bucket& b : buckets) {
      const int64_t n_rows = num_groups;
      b.call_rows.clear();
      b.call_layouts.assign(b.num_rounds, {});
      b.call_totals.assign(b.num_rounds, 0);
      if (b.num_rounds == 1) {  // the common case: the rows checked while collecting
        check_distinct_steps(b.single_call_rows, [&b](int64_t i) {
          return param_name(b.where[i].first, b.where[i].second, b.params[i]);
        });
        b.call_rows.push_back(std::move(b.single_call_rows));
        b.call_layouts[0] = std::move(b.single_call_layouts);
        b.call_totals[0] = b.single_call_total;
        continue;
      }
      for (int32_t round = 0; round < b.num_rounds; ++round) {
        const CallLists c = round_lists(b, round);
        const auto name_of = [&c](int64_t i) {
          return param_name(c.where[i].first, c.where[i].second, c.params[i]);
        };
        StorageTypes types{};
        b.call_rows.push_back(build_tensor_rows({c.params, c.grads, c.exp_avgs, c.exp_avg_sqs, c.max_exp_avg_sqs,
                                                 c.steps, c.masters, c.rng_streams, c.element_offsets,
                                                 b.stochastic_rounding, c.moment_absmax},
                                                b.device, n_rows, c.rows, b.call_totals[round],
                                                b.call_layouts[round], types, name_of));
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
        const RowsCall call{b.call_rows[round], b.call_layouts[round], b.call_totals[round], b.dtype, b.amsgrad,
                            counters[d], table, last_call_of_device[d] == k && round == b.num_rounds - 1,
                            grad_scales[d], found_infs[d], grad_clips[d], b.storage, b.stochastic_rounding};
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

}  // namespace noam_ext::step

// Argument checks shared by every implementation of noam_ext::fused_adamw_, and
// the host-side table of tensor rows (work_split.h) that every implementation
// runs from. Everything is checked before any memory is touched, so a failed
// call changes nothing. Messages name the offending list element through
// `name_of`, so that FusedAdamW can name the parameter instead ("parameter 3 of
// param group 1") when it checks a call before making it.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/FunctionRef.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <functional>
#include <numeric>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "adamw_math.h"
#include "storage.h"
#include "work_split.h"

namespace noam_ext {

// Names the i-th tensor of a call in error messages (called only on an error).
using TensorNamer = c10::function_ref<std::string(int64_t)>;

inline std::string list_element_name(int64_t i) {
  return "params[" + std::to_string(i) + "]";
}

// The tensors of one call, as the op receives them.
struct OpTensors {
  at::TensorList params;
  at::TensorList grads;
  at::TensorList exp_avgs;
  at::TensorList exp_avg_sqs;
  at::TensorList max_exp_avg_sqs;   // empty (no amsgrad) or one per param
  at::TensorList state_steps;
  at::TensorList masters = {};      // empty, or one float32 master / int16 remainder per param
  at::IntArrayRef rng_streams = {};       // empty (stream = list index) or one per param
  at::IntArrayRef element_offsets = {};   // empty (all 0) or one per param
  bool stochastic_rounding = false;
  // 8-bit moments (storage.h, quantized()): per param, the float32 scales of exp_avg and
  // exp_avg_sq, and of max_exp_avg_sq with amsgrad (2 or 3 per param, in that order); else empty.
  at::TensorList moment_absmax = {};
};

// One parameter's tensors within a call.
struct RowTensors {
  const at::Tensor& param;
  const at::Tensor& grad;
  const at::Tensor& exp_avg;
  const at::Tensor& exp_avg_sq;
  const at::Tensor* max_exp_avg_sq;   // null without amsgrad
  const at::Tensor* master;           // null without a master
  const at::Tensor& step;
  const at::Tensor* absmax[3] = {nullptr, nullptr, nullptr};   // 8-bit moments' scales (OpTensors)
};

// The storage types of a call, from its first parameter's tensors (every other
// parameter must match them).
inline StorageTypes storage_of(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                               const at::Tensor* master, const std::string& name = "params[0]") {
  MasterKind kind = MasterKind::kNone;
  if (master != nullptr) {
    TORCH_CHECK(master->defined() && (master->scalar_type() == at::kFloat || master->scalar_type() == at::kShort),
                "fused_adamw_: the master of ", name, " must be float32 (master weights) or int16 (the remainder "
                "of a bfloat16 parameter), got ",
                master->defined() ? c10::toString(master->scalar_type()) : "an undefined tensor");
    kind = master->scalar_type() == at::kShort ? MasterKind::kRemainder : MasterKind::kFloat32;
  }
  return {param.scalar_type(), grad.defined() ? grad.scalar_type() : param.scalar_type(),
          exp_avg.defined() ? exp_avg.scalar_type() : param.scalar_type(), kind};
}

// Why a call cannot store what it stores, or "" when it can: the one check of the storage
// combination (storage.h) and of stochastic rounding, made by the op, by FusedAdamW's step
// for each bucket and, through noam_ext._C.storage_problem, by its constructor.
inline std::string storage_problem(const StorageTypes& types, bool stochastic_rounding) {
  if (!is_supported_storage(types)) {
    return "is stored as " + describe(types) + ", which is not supported; supported:" + supported_storage_list();
  }
  if (stochastic_rounding && !types.stores_bfloat16()) {
    return "stores nothing in bfloat16 (" + describe(types) +
           "), and stochastic_rounding rounds what the step stores in bfloat16";
  }
  return "";
}

inline void check_storage(const StorageTypes& types, bool stochastic_rounding, const std::string& who) {
  const std::string problem = storage_problem(types, stochastic_rounding);
  TORCH_CHECK(problem.empty(), who, " ", problem);
}

// Where a call's rows start in its virtual index space (work_split.h): with 8-bit moments at
// multiples of a block, so that the CUDA kernels' chunks, which start at multiples of
// kMinChunkElements, cut rows only between blocks (csrc/cuda/quantized_walk.cuh).
constexpr int64_t row_alignment(const StorageTypes& types) {
  return types.quantized() ? kQuantBlock : kRowAlignElements;
}
static_assert(kQuantBlock % kRowAlignElements == 0, "a block is whole row alignments");

// The call-wide arguments: the schedule counter and the hyperparameter table.
inline void check_call_arguments(const at::Tensor& schedule_step, const at::Tensor& hyper) {
  TORCH_CHECK(schedule_step.scalar_type() == at::kLong && schedule_step.numel() == 1,
              "fused_adamw_: schedule_step must be a one-element int64 tensor (the schedule's completed steps)");
  // On the CPU, or (CUDA) on the call's device, where the kernel reads it as it is
  // when the launch runs: a CUDA graph replay sees changes made by stream-ordered copies.
  TORCH_CHECK(hyper.scalar_type() == at::kDouble && hyper.dim() == 2 && hyper.size(1) == kNumHyperColumns &&
                  hyper.is_contiguous() && (hyper.is_cpu() || hyper.device() == schedule_step.device()),
              "fused_adamw_: hyper must be a contiguous float64 [groups, ", int(kNumHyperColumns),
              "] tensor on the CPU or on the call's device (", schedule_step.device(), ")");
}

// The strided layout of a row (work_split.h) from its tensors' strides: dimensions of
// size 1 dropped, and neighbouring dimensions merged where every tensor lays them out
// contiguously one within the other. `tensors` holds the row's tensors in RowTensor
// order; a null one (no amsgrad) gets zero strides.
// The dimensions are walked in the parameter's memory order (by its strides, largest
// first) when the parameter is dense, so that element k is the k-th in its memory, as in a
// row whose tensors are all laid out alike: stochastic rounding keys its bits on k, and a
// gradient laid out unlike its parameter must not change them. A parameter with gaps is
// walked in its shape's order.
// The dimensions of `t`, outermost first, in the order a walk of its memory takes them: by
// their strides, largest first (a stable sort), or in its shape's order when not by memory.
inline c10::SmallVector<size_t, kMaxStridedDims> walk_order(const at::Tensor& t, bool in_memory_order) {
  c10::SmallVector<size_t, kMaxStridedDims> order(static_cast<size_t>(t.dim()));   // no allocation per step
  std::iota(order.begin(), order.end(), size_t{0});
  if (in_memory_order) {
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
      return t.stride(static_cast<int64_t>(a)) > t.stride(static_cast<int64_t>(b));
    });
  }
  return order;
}

// Whether the op walks a parameter in its memory order (it is dense) rather than its shape's.
inline bool walked_in_memory_order(const at::Tensor& p) { return p.is_contiguous() || p.is_non_overlapping_and_dense(); }

inline StridedLayout make_strided_layout(at::IntArrayRef sizes, const at::Tensor* const (&tensors)[kRowTensors],
                                         const std::string& name, bool in_parameter_memory_order) {
  StridedLayout layout{};
  int64_t ndim = 0;
  const c10::SmallVector<size_t, kMaxStridedDims> order = walk_order(*tensors[0], in_parameter_memory_order);
  for (const size_t d : order) {
    if (sizes[d] == 1) {
      continue;
    }
    auto stride_of = [&](int t) { return tensors[t] != nullptr ? tensors[t]->stride(static_cast<int64_t>(d)) : 0; };
    bool merges = ndim > 0;
    for (int t = 0; t < kRowTensors && merges; ++t) {
      merges = layout.strides[t][ndim - 1] == stride_of(t) * sizes[d];
    }
    if (merges) {   // the previous dimension steps over this whole one in every tensor
      layout.sizes[ndim - 1] *= sizes[d];
      for (int t = 0; t < kRowTensors; ++t) {
        layout.strides[t][ndim - 1] = stride_of(t);
      }
      continue;
    }
    TORCH_CHECK(ndim < kMaxStridedDims, "fused_adamw_: ", name, " and its gradient and state are laid out in "
                "more than ", kMaxStridedDims, " dimensions that cannot be merged; make them contiguous");
    layout.sizes[ndim] = sizes[d];
    for (int t = 0; t < kRowTensors; ++t) {
      layout.strides[t][ndim] = stride_of(t);
    }
    ++ndim;
  }
  layout.ndim = ndim;
  return layout;
}

// Elements from a tensor's data pointer to one past its last element (a view with gaps
// spans more than its numel).
inline int64_t element_extent(const at::Tensor& t) {
  if (t.numel() == 0) {
    return 0;
  }
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    last += (t.size(d) - 1) * t.stride(d);
  }
  return last + 1;
}

// Checks the tensors of the i-th parameter of a call and returns its row (offset
// and rounding stream left for the caller). Their dtypes must be the call's
// `types`. A row whose tensors are not dense and laid out alike gets a strided
// layout, appended to `layouts`.
inline TensorRow check_and_make_row(const RowTensors& t, const at::Device& device, const StorageTypes& types,
                                    int64_t group, int64_t n_groups, int64_t i, const TensorNamer& name_of,
                                    std::vector<StridedLayout>& layouts) {
  const at::Tensor& p = t.param;
  TORCH_CHECK(p.defined() && p.layout() == at::kStrided, "fused_adamw_: ", name_of(i),
              " must be a dense (strided) tensor");
  const at::ScalarType dtype = p.scalar_type();   // the call's (checked supported) or an error below
  TORCH_CHECK(p.device() == device, "fused_adamw_: ", name_of(i), " is on ", p.device(), " but this call runs on ",
              device, " (one call takes one device)");
  TORCH_CHECK(dtype == types.param, "fused_adamw_: ", name_of(i), " has dtype ", dtype, " but this call's "
              "parameters have ", types.param, " (one call takes one dtype)");
  const bool contiguous = p.is_contiguous();
  // A view with gaps (torch.randn(10, 5, 2)[..., 0]) is updated through a strided
  // layout; one whose elements share memory (expand) cannot be written in place.
  const bool dense = walked_in_memory_order(p);
  auto check_writable = [&](const at::Tensor& x, const char* what) {
    TORCH_CHECK(at::has_internal_overlap(x) != at::MemOverlap::Yes, "fused_adamw_: ", what, name_of(i),
                " has elements that share memory (an expanded tensor?); it cannot be updated in place");
  };
  if (!dense) {
    check_writable(p, "");
  }
  const at::IntArrayRef sizes = p.sizes();
  const int64_t numel = p.numel();
  // The common case first, in few reads: same layout, device, shape and (for a
  // contiguous parameter) contiguous, and the call's dtype for its kind of tensor.
  // Anything else gets the detailed checks.
  auto same = [](at::IntArrayRef a, at::IntArrayRef b) {   // a loop: shapes are short, memcmp's call is not
    if (a.size() != b.size()) {
      return false;
    }
    for (size_t d = 0; d < a.size(); ++d) {
      if (a[d] != b[d]) {
        return false;
      }
    }
    return true;
  };
  auto like_param = [&](const at::Tensor& x, at::ScalarType expected) {
    return x.defined() && x.layout() == at::kStrided && x.scalar_type() == expected && x.device() == device &&
           same(x.sizes(), sizes) && (numel <= 1 || (contiguous ? x.is_contiguous() : same(x.strides(), p.strides())));
  };
  bool alike = dense;   // every tensor dense with the parameter's strides: one linear walk serves all
  auto check_like_param = [&](const at::Tensor& x, at::ScalarType expected, const char* what, bool written) {
    if (like_param(x, expected)) {
      return;
    }
    TORCH_CHECK(x.defined() && x.layout() == at::kStrided, "fused_adamw_: the ", what, " of ", name_of(i),
                " must be a dense (strided) tensor", x.defined() && x.is_sparse() ? ", got a sparse one" : "");
    TORCH_CHECK(x.device() == device, "fused_adamw_: the ", what, " of ", name_of(i), " is on ", x.device(),
                " but the parameter is on ", p.device());
    TORCH_CHECK(x.scalar_type() == expected, "fused_adamw_: the ", what, " of ", name_of(i), " has dtype ",
                x.scalar_type(), " but this call's ", what, "s have ", expected, " (", describe(types), ")");
    TORCH_CHECK(x.sizes() == sizes, "fused_adamw_: the ", what, " of ", name_of(i), " has shape ", x.sizes(),
                " but the parameter has ", sizes);
    // Other strides than the parameter's: a strided layout walks each tensor by its own.
    if (written) {
      const std::string of = std::string("the ") + what + " of ";
      check_writable(x, of.c_str());
    }
    alike = false;
  };
  check_like_param(t.grad, types.grad, "gradient", false);
  check_like_param(t.exp_avg, types.moment, "exp_avg", true);
  check_like_param(t.exp_avg_sq, types.moment, "exp_avg_sq", true);
  if (t.max_exp_avg_sq != nullptr) {
    check_like_param(*t.max_exp_avg_sq, types.moment, "max_exp_avg_sq", true);
  }
  TORCH_CHECK((t.master != nullptr) == (types.master != MasterKind::kNone), "fused_adamw_: ", name_of(i),
              t.master != nullptr ? " has a master but this call's parameters have none"
                                  : " has no master but this call's parameters have one");
  if (t.master != nullptr) {
    check_like_param(*t.master, master_dtype(types.master), "master", true);
  }
  if (types.quantized()) {
    // One float32 scale per block of kQuantBlock elements, contiguous, for each 8-bit moment, of
    // any shape (FusedAdamW shapes them like the parameter, its last dimension counted in blocks,
    // where that dimension is whole blocks: noam_ext/_storage.py, scales_shape).
    const char* const names[3] = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"};
    const int count = t.max_exp_avg_sq != nullptr ? 3 : 2;
    for (int k = 0; k < count; ++k) {
      const at::Tensor* a = t.absmax[k];
      TORCH_CHECK(a != nullptr && a->defined() && a->scalar_type() == at::kFloat && a->device() == device &&
                      a->numel() == quantized_blocks(numel) && a->is_contiguous(),
                  "fused_adamw_: the 8-bit ", names[k], " of ", name_of(i), " needs its scales (", names[k],
                  "_absmax) as a contiguous float32 tensor of ", quantized_blocks(numel), " elements (one per ",
                  kQuantBlock, "-element block) on ", device,
                  a == nullptr || !a->defined() ? std::string(", got none")
                                                : ", got " + std::string(c10::toString(a->scalar_type())) +
                                                      " of shape " + c10::str(a->sizes()) + " on " +
                                                      c10::str(a->device()));
    }
  }
  const at::Tensor& step = t.step;
  TORCH_CHECK(step.defined() && step.scalar_type() == at::kFloat && step.numel() == 1 && step.device() == device,
              "fused_adamw_: the step of ", name_of(i), " must be a one-element float32 tensor on ", device);
  TORCH_CHECK(group >= 0 && group < n_groups, "fused_adamw_: ", name_of(i), " names hyperparameter row ", group,
              " but there are ", n_groups);
  TensorRow r{};
  r.numel = numel;
  r.param = p.data_ptr();
  r.grad = t.grad.const_data_ptr();
  r.exp_avg = t.exp_avg.data_ptr();
  r.exp_avg_sq = t.exp_avg_sq.data_ptr();
  r.max_exp_avg_sq = t.max_exp_avg_sq != nullptr ? t.max_exp_avg_sq->data_ptr() : nullptr;
  r.master = t.master != nullptr ? t.master->data_ptr() : nullptr;
  for (int k = 0; k < 3; ++k) {
    r.absmax[k] = types.quantized() && t.absmax[k] != nullptr ? t.absmax[k]->data_ptr<float>() : nullptr;
  }
  r.step = step.data_ptr<float>();
  r.group = static_cast<int32_t>(group);
  r.layout = -1;
  if (!alike && numel > 0) {
    const at::Tensor* const tensors[kRowTensors] = {&p, &t.grad, &t.exp_avg, &t.exp_avg_sq, t.max_exp_avg_sq,
                                                    t.master};
    layouts.push_back(make_strided_layout(sizes, tensors, name_of(i), /*in_parameter_memory_order=*/dense));
    r.layout = static_cast<int32_t>(layouts.size() - 1);
  }
  return r;
}

// Each parameter of a call needs a step tensor of its own: the CUDA prepare pass
// advances every row's step at once (a shared one would race), the CPU op would
// advance it twice.
inline void check_distinct_steps(const std::vector<TensorRow>& rows, const TensorNamer& name_of = list_element_name) {
  auto address = [&](size_t i) { return reinterpret_cast<uintptr_t>(rows[i].step); };
  // Steps made one after the other often lie in ascending memory: then one pass shows
  // they differ, without a sort.
  bool ascending = true;
  for (size_t i = 1; i < rows.size() && ascending; ++i) {
    ascending = address(i - 1) < address(i);
  }
  if (ascending) {
    return;
  }
  // The addresses alone first (a reused buffer, no allocation per step); the positions
  // only when two are equal, to name them.
  thread_local std::vector<uintptr_t> addresses;
  addresses.resize(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    addresses[i] = address(i);
  }
  std::sort(addresses.begin(), addresses.end());
  if (std::adjacent_find(addresses.begin(), addresses.end()) == addresses.end()) {
    return;
  }
  std::vector<std::pair<uintptr_t, int64_t>> steps;
  steps.reserve(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    steps.emplace_back(address(i), static_cast<int64_t>(i));
  }
  std::sort(steps.begin(), steps.end());
  for (size_t k = 1; k < steps.size(); ++k) {
    TORCH_CHECK(steps[k].first != steps[k - 1].first, "fused_adamw_: ", name_of(steps[k - 1].second), " and ",
                name_of(steps[k].second), " share one step tensor (state['step']); each parameter needs its own");
  }
}

// Checks the tensors of one call (all on `device`, hyper rows 0..n_groups-1) and
// returns their rows, in list order, with virtual offsets (work_split.h); `total`
// receives the virtual length, `layouts` the strided layouts the rows refer to, and
// `types` what the call's tensors are stored in.
inline std::vector<TensorRow> build_tensor_rows(const OpTensors& t, const at::Device& device, int64_t n_groups,
                                                at::IntArrayRef groups, int64_t& total,
                                                std::vector<StridedLayout>& layouts, StorageTypes& types,
                                                const TensorNamer& name_of = list_element_name) {
  const int64_t n = static_cast<int64_t>(t.params.size());
  TORCH_CHECK(static_cast<int64_t>(t.grads.size()) == n && static_cast<int64_t>(t.exp_avgs.size()) == n &&
                  static_cast<int64_t>(t.exp_avg_sqs.size()) == n &&
                  static_cast<int64_t>(t.state_steps.size()) == n && static_cast<int64_t>(groups.size()) == n,
              "fused_adamw_: params, grads, exp_avgs, exp_avg_sqs, state_steps and groups must have the same "
              "length (", n, ", ", t.grads.size(), ", ", t.exp_avgs.size(), ", ", t.exp_avg_sqs.size(), ", ",
              t.state_steps.size(), ", ", groups.size(), ")");
  const bool amsgrad = !t.max_exp_avg_sqs.empty();
  TORCH_CHECK(!amsgrad || static_cast<int64_t>(t.max_exp_avg_sqs.size()) == n,
              "fused_adamw_: max_exp_avg_sqs must be empty (no amsgrad) or have one tensor per param, got ",
              t.max_exp_avg_sqs.size(), " for ", n, " params");

  TORCH_CHECK(t.masters.empty() || static_cast<int64_t>(t.masters.size()) == n,
              "fused_adamw_: masters must be empty or have one tensor per param, got ", t.masters.size(), " for ",
              n, " params");
  TORCH_CHECK(t.rng_streams.empty() || static_cast<int64_t>(t.rng_streams.size()) == n,
              "fused_adamw_: rng_streams must be empty or have one stream per param, got ", t.rng_streams.size(),
              " for ", n, " params");
  TORCH_CHECK(t.element_offsets.empty() || static_cast<int64_t>(t.element_offsets.size()) == n,
              "fused_adamw_: element_offsets must be empty or have one offset per param, got ",
              t.element_offsets.size(), " for ", n, " params");
  const int64_t scales_per_param = amsgrad ? 3 : 2;
  std::vector<TensorRow> rows(n);
  int64_t end = 0;
  types = n > 0 ? storage_of(t.params[0], t.grads[0], t.exp_avgs[0],
                                                t.masters.empty() ? nullptr : &t.masters[0], name_of(0))
                                   : StorageTypes{at::kFloat, at::kFloat, at::kFloat, MasterKind::kNone};
  check_storage(types, t.stochastic_rounding, "fused_adamw_: " + (n > 0 ? name_of(0) : std::string("the call")));
  TORCH_CHECK(static_cast<int64_t>(t.moment_absmax.size()) == (types.quantized() ? n * scales_per_param : 0),
              "fused_adamw_: moment_absmax must have ",
              types.quantized() ? "one scale tensor per 8-bit moment of each param (" + std::to_string(scales_per_param) +
                                      " per param, " + std::to_string(n * scales_per_param) + " in all)"
                                : std::string("nothing unless the moments are 8-bit"),
              ", got ", t.moment_absmax.size());
  for (int64_t i = 0; i < n; ++i) {
    RowTensors row{t.params[i], t.grads[i], t.exp_avgs[i], t.exp_avg_sqs[i],
                   amsgrad ? &t.max_exp_avg_sqs[i] : nullptr, t.masters.empty() ? nullptr : &t.masters[i],
                   t.state_steps[i]};
    for (int64_t k = 0; k < (types.quantized() ? scales_per_param : 0); ++k) {
      row.absmax[k] = &t.moment_absmax[i * scales_per_param + k];
    }
    rows[i] = check_and_make_row(row, device, types, groups[i], n_groups, i, name_of, layouts);
    rows[i].rng_stream = t.rng_streams.empty() ? static_cast<uint64_t>(i) : static_cast<uint64_t>(t.rng_streams[i]);
    rows[i].element_offset = t.element_offsets.empty() ? 0 : t.element_offsets[i];
    TORCH_CHECK(rows[i].element_offset >= 0, "fused_adamw_: element_offsets[", i, "] is negative");
    // A block's elements then share the high 32 bits of their indices, and so stochastic
    // rounding's keys, which both devices take per block of 8-bit moments.
    TORCH_CHECK(!types.quantized() || rows[i].element_offset % kQuantBlock == 0, "fused_adamw_: element_offsets[",
                i, "] is ", rows[i].element_offset, ": with 8-bit moments it must be a multiple of the block, ",
                kQuantBlock);
    rows[i].offset = next_row_offset(end, row_alignment(types));
    end = rows[i].offset + rows[i].numel;
  }
  total = end;
  check_distinct_steps(rows, name_of);
  return rows;
}

// Elements from a row's parameter pointer to one past its last element.
inline int64_t row_param_extent(const TensorRow& row, const std::vector<StridedLayout>& layouts) {
  if (row.layout < 0 || row.numel == 0) {
    return row.numel;
  }
  const StridedLayout& l = layouts[row.layout];
  int64_t last = 0;
  for (int64_t d = 0; d < l.ndim; ++d) {
    last += (l.sizes[d] - 1) * l.strides[kParamTensor][d];
  }
  return last + 1;
}

// Parameters written by one call must not share memory: their elements would be
// updated concurrently. (FusedAdamW splits tied parameters over several calls.)
inline void check_no_shared_memory(const std::vector<TensorRow>& rows, const std::vector<StridedLayout>& layouts,
                                   int64_t element_size, const TensorNamer& name_of = list_element_name) {
  std::vector<std::pair<uintptr_t, int64_t>> spans;  // (start, row) of params with elements
  spans.reserve(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    if (rows[i].numel > 0) {
      spans.emplace_back(reinterpret_cast<uintptr_t>(rows[i].param), static_cast<int64_t>(i));
    }
  }
  std::sort(spans.begin(), spans.end());
  uintptr_t reach = 0;      // end of the furthest-reaching span so far
  int64_t reacher = -1;
  for (const auto& [start, i] : spans) {
    TORCH_CHECK(reacher < 0 || start >= reach, "fused_adamw_: ", name_of(reacher), " and ", name_of(i),
                " share memory; pass tensors that share memory in separate calls");
    const uintptr_t span_end = start + static_cast<uintptr_t>(row_param_extent(rows[i], layouts) * element_size);
    if (span_end > reach) {
      reach = span_end;
      reacher = i;
    }
  }
}

inline void check_scaler_tensors(const std::optional<at::Tensor>& grad_scale,
                                 const std::optional<at::Tensor>& found_inf, const at::Device& device,
                                 const std::optional<at::Tensor>& grad_clip = std::nullopt) {
  if (grad_clip) {
    TORCH_CHECK(grad_clip->numel() == 1 && grad_clip->scalar_type() == at::kDouble && grad_clip->device() == device,
                "fused_adamw_: grad_clip must be a one-element float64 tensor on ", device);
  }
  for (const auto* t : {&grad_scale, &found_inf}) {
    if (t->has_value()) {
      TORCH_CHECK((*t)->numel() == 1 && (*t)->scalar_type() == at::kFloat && (*t)->device() == device,
                  "fused_adamw_: grad_scale and found_inf must be one-element float32 tensors on ", device);
    }
  }
}

}  // namespace noam_ext

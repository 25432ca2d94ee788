// noam_ext::fused_adamw_ on CUDA: the whole AdamW + Noam step for one call's
// tensors in two launches (a per-row prepare pass and the update), on the current
// stream, without any host synchronisation. The kernels and their grid are in
// kernels.cuh (also run on the host in CI), the work split and the per-element math in
// multi_tensor_walk.cuh / element_update.cuh / adamw_math.h. This file holds what only a GPU has: the device
// copies of the call tables, and the launches.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <iterator>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "../noam_ext/run_rows.h"
#include "kernel_args.h"
#include "kernels.cuh"
#include "storage_units.cuh"

namespace noam_ext::cuda {
namespace {

using namespace noam_ext::cuda_plan;

int multiprocessor_count(int device) {
  static std::atomic<int> counts[64] = {};
  if (device < 64 && counts[device].load(std::memory_order_relaxed) > 0) {
    return counts[device].load(std::memory_order_relaxed);
  }
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (device < 64) {
    counts[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

// ---- bytes from the host to the device without pinned memory ---------------------------
//
// Inside a CUDA graph capture, a host-to-device copy must read pinned memory that
// lives as long as the graph, and allocating pinned memory during a capture works
// only with recent torch host allocators. A kernel's parameters, though, are copied
// into the graph when it is captured: these launches carry up to kLaunchBytes of the
// source each and write them out, at every replay (and, outside a capture, once).

constexpr int kLaunchBytes = 3968;   // 248 x 16 bytes: within the 4 KB parameter space of every CUDA version

struct LaunchBytes {
  uint4 words[kLaunchBytes / 16];
};

__global__ void write_bytes_kernel(char* dst, const LaunchBytes bytes, int count) {
  for (int i = static_cast<int>(threadIdx.x) * 16; i < count; i += static_cast<int>(blockDim.x) * 16) {
    if (i + 16 <= count) {
      *reinterpret_cast<uint4*>(dst + i) = bytes.words[i / 16];   // dst is 16-byte aligned
    } else {
      for (int k = i; k < count; ++k) {
        dst[k] = reinterpret_cast<const char*>(bytes.words)[k];
      }
    }
  }
}

void upload_by_launch(void* device_dst, const void* host_src, size_t bytes, cudaStream_t stream) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(device_dst) % 16 == 0, "upload_by_launch: the destination must be "
              "16-byte aligned");
  for (size_t offset = 0; offset < bytes; offset += kLaunchBytes) {
    const int count = static_cast<int>(std::min<size_t>(kLaunchBytes, bytes - offset));
    LaunchBytes chunk{};
    std::memcpy(&chunk, static_cast<const char*>(host_src) + offset, count);
    write_bytes_kernel<<<1, kThreadsPerBlock, 0, stream>>>(static_cast<char*>(device_dst) + offset, chunk, count);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// ---- what captured graphs hold ---------------------------------------------------------
//
// A graph holds, until it is destroyed (with every executable graph made from it, and
// their launches done), the memory its kernels and copies read: the capture hands it
// a CUDA user object whose release takes down a count (a table's, below) and hands
// back tensors, which the next call on a user thread then frees (the release runs on
// CUDA's own thread, where nothing may call CUDA or wait, as freeing memory might).

struct GraphHold {
  std::shared_ptr<std::atomic<int>> graphs;   // counted down at release (may be null)
  std::vector<at::Tensor> tensors;            // freed after release
};

// These and the table cache are never destroyed: at exit, a graph's release may still
// come, and freeing device memory after CUDA's teardown would fail.
std::mutex& released_mutex() {
  static auto* mutex = new std::mutex;
  return *mutex;
}

std::vector<at::Tensor>& released_tensors() {
  static auto* tensors = new std::vector<at::Tensor>;
  return *tensors;
}

void release_graph_hold(void* p) {   // CUDA's thread
  const std::unique_ptr<GraphHold> hold(static_cast<GraphHold*>(p));
  if (hold->graphs) {
    hold->graphs->fetch_sub(1);
  }
  if (!hold->tensors.empty()) {
    const std::lock_guard<std::mutex> lock(released_mutex());
    for (at::Tensor& t : hold->tensors) {
      released_tensors().push_back(std::move(t));
    }
  }
}

void free_released_tensors() {
  std::vector<at::Tensor> released;
  {
    const std::lock_guard<std::mutex> lock(released_mutex());
    released.swap(released_tensors());
  }
}   // freed here, outside the lock

// Makes the graph being captured on `stream` keep `hold` until it is destroyed.
void hold_for_captured_graph(cudaStream_t stream, std::unique_ptr<GraphHold> hold) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  cudaGraph_t graph = nullptr;
#if CUDART_VERSION >= 12000
  C10_CUDA_CHECK(cudaStreamGetCaptureInfo(stream, &status, nullptr, &graph));
#else
  C10_CUDA_CHECK(cudaStreamGetCaptureInfo_v2(stream, &status, nullptr, &graph));
#endif
  TORCH_CHECK(status == cudaStreamCaptureStatusActive && graph != nullptr,
              "noam_ext: the stream's CUDA graph capture is not active");
  if (hold->graphs) {
    hold->graphs->fetch_add(1);   // taken down by release_graph_hold, whatever happens below
  }
  cudaUserObject_t object = nullptr;
  GraphHold* released = hold.release();
  const cudaError_t created =
      cudaUserObjectCreate(&object, released, &release_graph_hold, 1, cudaUserObjectNoDestructorSync);
  if (created != cudaSuccess) {
    release_graph_hold(released);
    C10_CUDA_CHECK(created);
  }
  const cudaError_t retained = cudaGraphRetainUserObject(graph, object, 1, cudaGraphUserObjectMove);
  if (retained != cudaSuccess) {
    C10_CUDA_CHECK(cudaUserObjectRelease(object, 1));   // released: the graph holds nothing
    C10_CUDA_CHECK(retained);
  }
}

// ---- device copies of the call tables ------------------------------------------------
//
// Per (device, stream), the device copies of recent call tables: the rows, the
// hyperparameter table when the call passed it on the host, and room for the prepare
// pass's per-row coefficients. In steady-state training the tensors, and so the table,
// are the same every step, and it is uploaded once (a stream-ordered copy from pinned
// memory: no host sync). FusedAdamW passes its hyperparameters on the device
// (noam_ext/_hyper.py keeps them current with stream-ordered copies), so a change of lr
// is not a new table.
//
// A table used while a CUDA graph is captured is kept for as long as that graph
// lives (above): the graph's kernels, and the copy that fills the table at each
// replay, have its address. A table no live graph uses is forgotten like any other,
// so captures keep only what live graphs need.

struct DeviceTable {
  std::vector<char> key;      // the uploaded bytes: rows, strided layouts, then host hyperparameters
  size_t layouts_offset = 0;  // where the strided layouts start
  size_t hyper_offset = 0;    // where the hyperparameters start (if uploaded)
  size_t coefficients_offset = 0;
  at::Tensor staging;         // pinned host copy for eager uploads (made at the first one)
  at::Tensor source;          // for a table made during a capture: the same bytes already on the
                              // device (another stream's table), which the graph copies at each replay
  at::Tensor device;
  // Live CUDA graphs that use this table (counted down by release_graph_hold).
  std::shared_ptr<std::atomic<int>> graphs = std::make_shared<std::atomic<int>>(0);
  // Whether an upload has run outside a capture. A copy issued while a graph is
  // captured only runs when that graph replays: until an eager upload, every use
  // issues the copy again (in a new capture, into that graph; eagerly, now).
  bool filled = false;
};

struct DeviceTablePointers {
  const TensorRow* rows;
  const StridedLayout* layouts;
  const double* hyper;        // null when the call's hyperparameters are on the device already
  void* coefficients;
};

// The pointers of a table, and the cache's lock: held until the call's launches are
// queued, so that no other thread evicts (and frees) the table in between.
struct LockedTable {
  std::unique_lock<std::mutex> lock;
  DeviceTablePointers pointers;
};

constexpr size_t kCachedTablesPerStream = 8;   // besides those live graphs use

size_t round_up_16(size_t n) { return (n + 15) / 16 * 16; }

std::mutex& cache_mutex() {
  static auto* mutex = new std::mutex;
  return *mutex;
}

std::map<std::pair<int, cudaStream_t>, std::list<DeviceTable>>& caches() {
  static auto* tables = new std::map<std::pair<int, cudaStream_t>, std::list<DeviceTable>>;
  return *tables;
}

// The graph being captured on `stream` keeps `table`.
void hold_table_for_captured_graph(DeviceTable& table, cudaStream_t stream) {
  auto hold = std::make_unique<GraphHold>();
  hold->graphs = table.graphs;
  hold_for_captured_graph(stream, std::move(hold));
}

// Forgets the tables of one stream that no live graph uses, but the
// kCachedTablesPerStream most recently used (the front one, the call's, among them).
void evict(std::list<DeviceTable>& cache) {
  size_t kept = 0;
  for (auto it = cache.begin(); it != cache.end();) {
    if (it->graphs->load() > 0 || kept++ < kCachedTablesPerStream) {
      ++it;
    } else {
      it = cache.erase(it);   // its last launches are queued on this stream: the allocator reuses it after them
    }
  }
}

LockedTable device_table(const std::vector<TensorRow>& rows, const std::vector<StridedLayout>& layouts,
                         const at::Tensor* host_hyper, const at::Device& device, cudaStream_t stream) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  const bool capturing = capture != cudaStreamCaptureStatusNone;

  const size_t row_bytes = rows.size() * sizeof(TensorRow);
  const size_t layouts_offset = round_up_16(row_bytes);
  const size_t layout_bytes = layouts.size() * sizeof(StridedLayout);
  const size_t hyper_offset = round_up_16(layouts_offset + layout_bytes);
  const size_t hyper_bytes = host_hyper ? static_cast<size_t>(host_hyper->numel()) * sizeof(double) : 0;
  const void* hyper_values = host_hyper ? host_hyper->const_data_ptr() : nullptr;
  // Compared in place: the steady state (the same table every step) allocates nothing.
  auto holds_this_call = [&](const DeviceTable& t) {
    return t.key.size() == hyper_offset + hyper_bytes && t.layouts_offset == layouts_offset &&
           std::memcmp(t.key.data(), rows.data(), row_bytes) == 0 &&
           (layout_bytes == 0 || std::memcmp(t.key.data() + layouts_offset, layouts.data(), layout_bytes) == 0) &&
           (hyper_bytes == 0 || std::memcmp(t.key.data() + hyper_offset, hyper_values, hyper_bytes) == 0);
  };
  auto pointers = [&](DeviceTable& t) {
    char* base = static_cast<char*>(t.device.data_ptr());
    return DeviceTablePointers{reinterpret_cast<const TensorRow*>(base),
                               reinterpret_cast<const StridedLayout*>(base + t.layouts_offset),
                               host_hyper ? reinterpret_cast<const double*>(base + t.hyper_offset) : nullptr,
                               base + t.coefficients_offset};
  };

  // On the current stream, as the launches. During a capture nothing is allocated on
  // the host: the bytes come from another stream's table or from kernel parameters.
  auto upload = [&](DeviceTable& t) {
    const auto bytes = static_cast<int64_t>(t.key.size());
    if (capturing) {
      if (t.source.defined()) {
        t.device.narrow(0, 0, bytes).copy_(t.source.narrow(0, 0, bytes), /*non_blocking=*/true);
      } else {
        upload_by_launch(t.device.data_ptr(), t.key.data(), t.key.size(), stream);
      }
      hold_table_for_captured_graph(t, stream);
      return;
    }
    if (!t.staging.defined()) {
      t.staging = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
      std::memcpy(t.staging.data_ptr(), t.key.data(), t.key.size());
    }
    t.device.narrow(0, 0, bytes).copy_(t.staging, /*non_blocking=*/true);
    t.filled = true;
  };

  free_released_tensors();
  std::unique_lock<std::mutex> lock(cache_mutex());
  auto& cache = caches()[{device.index(), stream}];
  for (auto it = cache.begin(); it != cache.end(); ++it) {
    // A capture never shares a table a live graph holds: the prepare launch writes the
    // table's coefficients at every replay, and two graphs replayed on two streams
    // would race on them. Each capture gets a table (and coefficients) of its own.
    if (capturing && it->graphs->load() > 0) {
      continue;
    }
    if (holds_this_call(*it)) {
      if (!it->filled) {
        upload(*it);
      } else if (capturing) {
        hold_table_for_captured_graph(*it, stream);
      }
      cache.splice(cache.begin(), cache, it);  // most recently used first
      return {std::move(lock), pointers(cache.front())};
    }
  }
  DeviceTable table;
  table.key.assign(hyper_offset + hyper_bytes, 0);
  std::memcpy(table.key.data(), rows.data(), row_bytes);
  if (layout_bytes > 0) {
    std::memcpy(table.key.data() + layouts_offset, layouts.data(), layout_bytes);
  }
  table.layouts_offset = layouts_offset;
  if (host_hyper) {
    std::memcpy(table.key.data() + hyper_offset, hyper_values, hyper_bytes);
  }
  table.hyper_offset = hyper_offset;
  table.coefficients_offset = round_up_16(table.key.size());
  const auto length = static_cast<int64_t>(table.coefficients_offset + coefficient_bytes(rows.size()));
  if (capturing) {
    // The usual capture follows warm-up steps on another stream, whose table holds
    // these bytes: copy them from there (device to device; torch.cuda.graph has
    // synchronised the device before capturing, and those bytes never change).
    for (auto& [where, other] : caches()) {
      if (where.first == device.index() && !table.source.defined()) {   // this stream's too: a held table
        for (const DeviceTable& t : other) {
          if (t.filled && t.key == table.key) {
            table.source = t.device;   // held: the graph's copy reads it at every replay
            break;
          }
        }
      }
    }
  }
  table.device = at::empty({length}, at::TensorOptions().dtype(at::kByte).device(device));
  cache.push_front(std::move(table));
  upload(cache.front());
  evict(cache);
  return {std::move(lock), pointers(cache.front())};
}

}  // namespace

std::vector<int64_t> table_cache_stats() {
  const std::lock_guard<std::mutex> lock(cache_mutex());
  int64_t tables = 0, held = 0;
  for (const auto& [where, cache] : caches()) {
    for (const DeviceTable& t : cache) {
      ++tables;
      held += t.graphs->load() > 0 ? 1 : 0;
    }
  }
  return {tables, held};
}

namespace {

// torch.ops.noam_ext.upload_by_launch_: src's bytes (a contiguous CPU tensor) into dst
// (a contiguous tensor on a GPU, at least as large), on dst's device's current stream,
// by launches that carry the bytes: allowed in a CUDA graph capture without pinned
// memory, and each replay writes them again (noam_ext/_hyper.py).
void upload_by_launch_op(const at::Tensor& dst, const at::Tensor& src) {
  TORCH_CHECK(src.is_cpu() && src.is_contiguous(), "upload_by_launch_: src must be a contiguous CPU tensor");
  TORCH_CHECK(dst.is_cuda() && dst.is_contiguous() && dst.nbytes() >= src.nbytes(),
              "upload_by_launch_: dst must be a contiguous GPU tensor of at least src's ", src.nbytes(), " bytes");
  const c10::cuda::CUDAGuard guard(dst.device());
  upload_by_launch(dst.data_ptr(), src.const_data_ptr(), src.nbytes(),
                   c10::cuda::getCurrentCUDAStream(dst.device().index()).stream());
}

// torch.ops.noam_ext.hold_for_captured_graph: during a CUDA graph capture on the
// tensors' device's current stream, the graph being captured keeps the tensors until
// it is destroyed (noam_ext/_hyper.py: the tables its replays fill and read);
// otherwise nothing.
void hold_for_captured_graph_op(at::TensorList tensors) {
  free_released_tensors();
  if (tensors.empty()) {
    return;
  }
  const at::Device device = tensors[0].device();
  TORCH_CHECK(device.is_cuda(), "hold_for_captured_graph: the tensors must be on a GPU");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture == cudaStreamCaptureStatusNone) {
    return;
  }
  auto hold = std::make_unique<GraphHold>();
  hold->tensors = tensors.vec();
  hold_for_captured_graph(stream, std::move(hold));
}

// The launches of a call: those of its storage's unit (storage_units.cuh). Worked out
// before the first launch: nothing may throw between the two.
using StorageLaunches = StepLaunches (*)(bool, int64_t, int64_t, int64_t, bool);
#define NOAM_EXT_UNIT_ENTRY(k) &launches_of_storage_##k,
constexpr StorageLaunches kStorageLaunches[] = {NOAM_EXT_FOR_EACH_STORAGE(NOAM_EXT_UNIT_ENTRY)};
#undef NOAM_EXT_UNIT_ENTRY
static_assert(std::size(kStorageLaunches) == std::size(kSupportedStorage),
              "storage_units.cuh's NOAM_EXT_FOR_EACH_STORAGE must list every storage of storage.h");

StepLaunches storage_launches(const StorageTypes& storage, bool amsgrad, int64_t num_rows, int64_t total,
                              int64_t multiprocessors, bool strided_rows) {
  return kStorageLaunches[storage_index(storage)](amsgrad, num_rows, total, multiprocessors, strided_rows);
}

}  // namespace

void run_rows(const RowsCall& call) {
  TORCH_CHECK(call.schedule_step.is_cuda(), "fused_adamw_: the CUDA path needs the schedule counter on the GPU");
  const at::Device device = call.schedule_step.device();
  TORCH_CHECK(call.hyper.is_cpu() || call.hyper.device() == device, "fused_adamw_: hyper must be on the CPU or on ",
              device, ", got ", call.hyper.device());
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const bool hyper_on_host = call.hyper.is_cpu();
  const auto num_rows = static_cast<int64_t>(call.rows.size());
  const StepLaunches launches =
      storage_launches(call.storage, call.amsgrad, num_rows, call.total, multiprocessor_count(device.index()),
                       !call.layouts.empty());
  const LockedTable table =
      device_table(call.rows, call.layouts, hyper_on_host ? &call.hyper : nullptr, device, stream);
  const double* hyper = hyper_on_host ? table.pointers.hyper : call.hyper.const_data_ptr<double>();
  const KernelArgs args =
      make_kernel_args(call, launches.chunk_elements, table.pointers.rows, table.pointers.layouts, hyper,
                       table.pointers.coefficients);
  if (launches.prepare.blocks > 0) {
    launches.prepare.kernel<<<launches.prepare.blocks, launches.prepare.threads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  launches.update.kernel<<<launches.update.blocks, launches.update.threads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (launches.strided.blocks > 0) {
    launches.strided.kernel<<<launches.strided.blocks, launches.strided.threads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// fused_adamw_ is registered in adamw_cuda_op.cpp (its argument checks compiled by the
// C++ compiler only).
TORCH_LIBRARY_IMPL(noam_ext, CUDA, m) {
  m.impl("upload_by_launch_", &upload_by_launch_op);
  m.impl("hold_for_captured_graph", &hold_for_captured_graph_op);
}

std::vector<LaunchPointers> launch_pointers() {
  std::vector<LaunchPointers> out;
#define NOAM_EXT_ADD_POINTERS(k) launch_pointers_of_storage_##k(out);
  NOAM_EXT_FOR_EACH_STORAGE(NOAM_EXT_ADD_POINTERS)
#undef NOAM_EXT_ADD_POINTERS
  return out;
}

}  // namespace noam_ext::cuda

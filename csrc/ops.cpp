// The op schemas, in one place. Implementations are registered per device in
// their own files (cpu/adamw_cpu.cpp, cuda/adamw_cuda.cu, cpu/grad_norm_cpu.cpp);
// every op here is one users or the library call (the host run of the CUDA kernels,
// for tests, is an extension of its own: tests/host_run/);
// the fake (meta) implementations used by torch.compile and fake tensors live in
// noam_ext/_ops.py, and the Python module itself in python_module.cpp.
#include <torch/library.h>

TORCH_LIBRARY(noam_ext, m) {
  // One AdamW step over lists of tensors (as torch._fused_adamw_ takes them):
  // every parameter of every param group of one (device, dtype) in one pass,
  // reading each tensor where it lives.
  //   params, grads, exp_avgs, exp_avg_sqs: one per parameter, same shape, dtype
  //                   and strides; params must not share memory with each other
  //   max_exp_avg_sqs: empty, or one per parameter (amsgrad)
  //   state_steps:    torch's state["step"]: one-element float32 tensors on the
  //                   device, read for the bias corrections and incremented
  //   schedule_step:  int64 [1] on the device: completed steps of the in-op
  //                   schedule (advanced by the call when advance_schedule)
  //   hyper:          float64 [rows, kNumHyperColumns]: lr, betas, eps, weight decay,
  //                   maximize and the schedule's settings per row
  //                   (csrc/noam_ext/adamw_math.h, schedule_math.h); on the CPU,
  //                   or for CUDA also on the call's device, where the kernels read it
  //                   when they run (so CUDA graph replays see stream-ordered updates)
  //   groups:         the hyper row of each parameter
  //   advance_schedule: whether this call counts as a completed schedule step
  //                   (false for all but the last call of an optimizer step)
  //   grad_scale, found_inf: torch.amp.GradScaler's tensors; when found_inf is
  //                   non-zero the step changes no parameter, moment or step.
  //   grad_clip:      float64 [1] on the device, or None: every gradient is multiplied
  //                   by it (after the unscaling) as it is read, so that clipping by
  //                   global norm costs no pass of its own (FusedAdamW.clip_grad_norm_)
  //   masters:        empty, or per param a float32 master (of a bfloat16/float16 param)
  //                   or an int16 remainder (of a bfloat16 param); see storage.h for the
  //                   supported combinations of param, grad, moment and master dtypes
  //   rng_streams, element_offsets: stochastic rounding's stream per param (default:
  //                   its list index) and the index of its element 0 within the whole
  //                   parameter (default 0; a shard's offset)
  //   stochastic_rounding: round what is stored in bfloat16 stochastically, with bits
  //                   from (stream, the param's step, the element's index) (adamw_math.h)
  //   moment_absmax:  with uint8 moments (8-bit codes, noam_ext/quantization.h): per param the
  //                   float32 scales of exp_avg, exp_avg_sq and (amsgrad) max_exp_avg_sq, one
  //                   per 256-element block, in that order; otherwise empty or None
  m.def(
      "fused_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, Tensor(f!) schedule_step, Tensor hyper, "
      "int[] groups, *, bool advance_schedule=True, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "Tensor? grad_clip=None, Tensor(g!)[]? masters=None, int[] rng_streams=[], int[] element_offsets=[], "
      "bool stochastic_rounding=False, Tensor(h!)[]? moment_absmax=None) -> ()");
  // The global norm of a list of gradients, as torch.nn.utils.get_total_norm defines
  // it, for FusedAdamW.clip_grad_norm_: norm_type 2.0 (sqrt of the sum of squares,
  // accumulated in float64) or inf (max |g|; a NaN anywhere gives NaN). Gradients of
  // any supported dtypes, on the CPU. Returns a 0-dim float64 tensor; an empty list
  // has norm 0. The same result for any number of threads (csrc/cpu/grad_norm_cpu.cpp).
  m.def("grad_norm(Tensor[] grads, float norm_type) -> Tensor");
  // CUDA builds only (csrc/cuda/adamw_cuda.cu). src's bytes (a contiguous CPU tensor)
  // into dst (a contiguous GPU tensor) by kernel launches that carry them as
  // parameters: a CUDA graph capture records them without pinned memory, and each
  // replay writes them again (noam_ext/_hyper.py).
  m.def("upload_by_launch_(Tensor(a!) dst, Tensor src) -> ()");
  // CUDA builds only: during a CUDA graph capture, the graph being captured keeps the
  // tensors (which its replays read or write) until it is destroyed; otherwise nothing.
  m.def("hold_for_captured_graph(Tensor[] tensors) -> ()");
}

"""Python-side registrations for the C++ ops: fake (meta) implementations, so
that torch.compile, FakeTensor and torch.library.opcheck can reason about them
without running them. The schemas themselves are in csrc/ops.cpp."""

from __future__ import annotations

import torch


@torch.library.register_fake("noam_ext::fused_adamw_")
def _fused_adamw_fake(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, param_steps, schedule_step,
                      segments, hyper, active, *, grad_scale=None,
                      found_inf=None) -> None:
    # In-place on its mutable arguments, returns nothing: nothing to allocate.
    torch._check(param.dim() == 1, lambda: "fused_adamw_: param must be a 1-D flat buffer")
    return None


@torch.library.register_fake("noam_ext::emulate_cuda_fused_adamw_")
def _emulate_cuda_fused_adamw_fake(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, param_steps,
                                   schedule_step, segments, hyper, active, *, num_blocks,
                                   threads_per_block, grad_scale=None, found_inf=None) -> None:
    return None

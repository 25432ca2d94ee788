"""Python-side registrations for the C++ ops: fake (meta) implementations, so
that torch.compile, FakeTensor and torch.library.opcheck can reason about them
without running them. The schemas themselves are in csrc/ops.cpp."""

from __future__ import annotations

import torch


@torch.library.register_fake("noam_ext::fused_adamw_")
def _fused_adamw_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, schedule_step,
                      hyper, groups, *, advance_schedule=True, grad_scale=None, found_inf=None,
                      grad_clip=None, masters=None, rng_streams=(), element_offsets=(),
                      stochastic_rounding=False, moment_absmax=None) -> None:
    # In-place on its mutable arguments, returns nothing: nothing to allocate.
    torch._check(len(grads) == len(params), lambda: "fused_adamw_: one gradient per parameter")
    return None


@torch.library.register_fake("noam_ext::grad_norm")
def _grad_norm_fake(grads, norm_type) -> torch.Tensor:
    # A 0-dim float64 norm on the gradients' device (the CPU for an empty list).
    torch._check(norm_type in (2.0, float("inf")),
                 lambda: f"grad_norm: norm_type must be 2.0 or inf, got {norm_type}")
    device = grads[0].device if grads else torch.device("cpu")
    for i, g in enumerate(grads):
        torch._check(g.device == device,
                     lambda: f"grad_norm: grads[{i}] is on {g.device} but grads[0] is on {device} (one call takes "
                             "one device)")
    return torch.empty((), dtype=torch.float64, device=device)

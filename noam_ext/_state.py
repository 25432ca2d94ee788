"""Creating optimizer state the way torch.optim.AdamW's fused path does, lazily
at a parameter's first step, in torch's format: state[p] = {"step": float32
scalar on p's device, "exp_avg", "exp_avg_sq"[, "max_exp_avg_sq"]} shaped like p.

The moments of the parameters that start together are views into one
allocation per (device, dtype) (fewer allocations, neighbouring memory). They
are ordinary tensors to everyone else: the optimizer reads whatever
optimizer.state holds at each step, so a replaced, loaded or cleared state is
used (or re-created) exactly as torch would."""

from __future__ import annotations

from collections import defaultdict

import torch

STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

# Slots in the shared allocation start on 64-byte boundaries (a cache line; the
# CUDA kernel's 16-byte vectors need 16).
ALIGN_BYTES = 64


def _is_wrapper_subclass(p: torch.Tensor) -> bool:
    """DTensor and other tensor subclasses: their state must be made with
    zeros_like so that it is of the same kind (sharded like the parameter)."""
    return type(p) not in (torch.Tensor, torch.nn.Parameter)


def _slot_offsets(numels: list[int], element_size: int) -> tuple[list[int], int]:
    align = max(1, ALIGN_BYTES // element_size)
    offsets, end = [], 0
    for n in numels:
        start = -(-end // align) * align
        offsets.append(start)
        end = start + n
    return offsets, end


def create_state(params: list[torch.Tensor], amsgrad: list[bool]) -> list[dict]:
    """Fresh state for each parameter (all distinct), in the order given."""
    states: list[dict | None] = [None] * len(params)
    together: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        if _is_wrapper_subclass(p) or not p.is_contiguous():
            states[i] = state_like(p, amsgrad[i])
        else:
            together[(p.device, p.dtype)].append(i)
    for (device, dtype), members in together.items():
        numels = [params[i].numel() for i in members]
        offsets, length = _slot_offsets(numels, params[members[0]].element_size())
        with_max = any(amsgrad[i] for i in members)
        moments = {key: torch.zeros(length, dtype=dtype, device=device)
                   for key in STATE_KEYS if key != "max_exp_avg_sq" or with_max}
        steps = torch.zeros(len(members), dtype=torch.float32, device=device)
        for k, (i, offset, numel) in enumerate(zip(members, offsets, numels)):
            shape = params[i].shape
            state = {"step": steps[k]}
            for key, flat in moments.items():
                if key != "max_exp_avg_sq" or amsgrad[i]:
                    state[key] = flat[offset:offset + numel].view(shape)
            states[i] = state
    return states


def state_like(p: torch.Tensor, amsgrad: bool) -> dict:
    """Fresh state for one parameter, as torch.optim.AdamW's fused path makes it."""
    state = {"step": torch.zeros((), dtype=torch.float32, device=p.device)}
    for key in STATE_KEYS:
        if key != "max_exp_avg_sq" or amsgrad:
            state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


def step_on_device(value, device: torch.device) -> torch.Tensor:
    """state["step"] as the op reads it: a float32 scalar on the parameter's device
    (torch.optim.AdamW checkpoints keep it on the CPU, older ones as a float)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=torch.float32).reshape(())
    return torch.tensor(float(value), dtype=torch.float32, device=device)

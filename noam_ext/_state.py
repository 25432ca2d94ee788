"""Optimizer state the way torch.optim.AdamW's fused path keeps it: state[p] =
{"step": float32 scalar on p's device, "exp_avg", "exp_avg_sq"[, "max_exp_avg_sq"]}
shaped like p, created lazily at a parameter's first step (noam_ext._storage.state_for,
which also makes the masters of the low-byte options).

Each moment has its own storage, made with zeros_like as torch makes it (so it has
the parameter's strides where the parameter is dense, is a DTensor sharded like a
DTensor parameter, and one parameter's state can be saved, copied or freed alone).
An earlier version carved the moments of parameters that start together out of one
allocation: measured on the whole-iteration benchmark, that bought nothing
(docs/adamw.md, "Memory"), and it made one parameter's state drag the whole
allocation into torch.save, copy.deepcopy and memory."""

from __future__ import annotations

import torch

def step_on_device(value, device: torch.device) -> torch.Tensor:
    """state["step"] as the op reads it: a float32 scalar on the parameter's device
    (torch.optim.AdamW checkpoints keep it on the CPU, older ones as a float)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=torch.float32).reshape(())
    return torch.tensor(float(value), dtype=torch.float32, device=device)

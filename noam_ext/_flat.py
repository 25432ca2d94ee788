"""Flat buffers: every parameter of one (device, dtype), its gradient and its
AdamW state laid out contiguously, so that one op call updates them all.

Each parameter, gradient and state tensor becomes a view into its buffer. A
parameter's slot starts on a 64-byte boundary, so vector loads (16 bytes on
GPUs, up to 64 bytes with AVX-512) never straddle two parameters and every
parameter starts aligned; the few padding elements between slots are never read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import _C

# Columns of the hyperparameter table; keep in sync with csrc/noam_ext/adamw_math.h.
LR, BETA1, BETA2, EPS, WEIGHT_DECAY, D_MODEL, WARMUP, AMSGRAD, MAXIMIZE = range(9)
NUM_HYPER_COLUMNS = 9

ALIGN_BYTES = 64
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def aligned_offsets(numels: list[int], element_size: int) -> tuple[list[int], int]:
    """Start offset of each slot (aligned to ALIGN_BYTES) and the total length."""
    align = max(1, ALIGN_BYTES // element_size)
    offsets, end = [], 0
    for n in numels:
        start = -(-end // align) * align
        offsets.append(start)
        end = start + n
    return offsets, end


@dataclass
class FlatBuffer:
    """The parameters of one (device, dtype) and everything the op needs for them."""

    device: torch.device
    dtype: torch.dtype
    params: list[torch.Tensor]
    group_index: list[int]          # param -> index of its param group
    offsets: list[int]
    length: int
    param_flat: torch.Tensor
    grad_flat: torch.Tensor
    grad_views: list[torch.Tensor]
    grad_addresses: torch.Tensor    # int64 [n]: where each grad view starts (fast "all in place" check)
    segments: torch.Tensor          # int64 [n, 3]: offset, numel, group, on the device
    param_steps: torch.Tensor       # float32 [n], torch's state["step"] of each param
    schedule_step: torch.Tensor     # int64 [1], steps of the in-op schedule
    state_flat: dict[str, torch.Tensor] = field(default_factory=dict)
    # Which gradients autograd delivered since the last zero_grad(set_to_none=True).
    arrived: bytearray = field(default_factory=bytearray)
    grads_logically_none: bool = False
    hook_handles: list = field(default_factory=list)

    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        p = self.params[i]
        return flat[self.offsets[i]:self.offsets[i] + p.numel()].view(p.shape)

    @classmethod
    def build(cls, params: list[torch.Tensor], group_index: list[int]) -> "FlatBuffer":
        """Moves params (and any existing grads) into fresh flat buffers; the
        parameters become views into them. State is adopted separately."""
        device, dtype = params[0].device, params[0].dtype
        offsets, length = aligned_offsets([p.numel() for p in params], params[0].element_size())
        param_flat = torch.zeros(length, device=device, dtype=dtype)
        grad_flat = torch.zeros(length, device=device, dtype=dtype)
        buffer = cls(
            device=device, dtype=dtype, params=params, group_index=group_index, offsets=offsets,
            length=length, param_flat=param_flat, grad_flat=grad_flat, grad_views=[],
            grad_addresses=torch.zeros(len(params), dtype=torch.int64),
            segments=torch.tensor([[o, p.numel(), g] for o, p, g in zip(offsets, params, group_index)],
                                  dtype=torch.int64).reshape(-1, 3).to(device),
            param_steps=torch.zeros(len(params), dtype=torch.float32, device=device),
            schedule_step=torch.zeros(1, dtype=torch.int64, device=device),
            arrived=bytearray(len(params)),
        )
        with torch.no_grad():
            for i, p in enumerate(params):
                slot = buffer.view(param_flat, i)
                slot.copy_(p)
                p.data = slot
                grad_view = buffer.view(grad_flat, i)
                buffer.grad_views.append(grad_view)
                buffer.grad_addresses[i] = grad_view.data_ptr()
                if p.grad is not None:
                    grad_view.copy_(p.grad)
                    p.grad = grad_view
                    buffer.arrived[i] = 1
        buffer._register_arrival_hooks()
        return buffer

    def _register_arrival_hooks(self) -> None:
        arrived = self.arrived  # the hooks hold the bytearray, not the optimizer
        for i, p in enumerate(self.params):
            if p.requires_grad:
                def mark(_param, _i=i):
                    arrived[_i] = 1
                self.hook_handles.append(p.register_post_accumulate_grad_hook(mark))

    def release(self) -> None:
        for handle in self.hook_handles:
            handle.remove()
        self.hook_handles.clear()

    # ---- state -------------------------------------------------------------------------

    def ensure_state_buffers(self, amsgrad: bool) -> None:
        for key in STATE_KEYS:
            if key == "max_exp_avg_sq" and not amsgrad:
                continue
            if key not in self.state_flat:
                self.state_flat[key] = torch.zeros(self.length, device=self.device, dtype=self.dtype)

    def state_views(self, i: int, amsgrad: bool) -> dict[str, torch.Tensor]:
        """The torch.optim.AdamW-format state of param i, as views into the buffers."""
        state = {"step": self.param_steps[i]}
        for key in STATE_KEYS:
            if key == "max_exp_avg_sq" and not amsgrad:
                continue
            state[key] = self.view(self.state_flat[key], i)
        return state

    def adopt_state(self, i: int, state: dict, amsgrad: bool) -> dict[str, torch.Tensor]:
        """Copies a param's state (any device/dtype, e.g. from a checkpoint) into
        the buffers and returns the view-based state that replaces it."""
        self.ensure_state_buffers(amsgrad or "max_exp_avg_sq" in state)
        with torch.no_grad():
            step = state.get("step", 0)
            self.param_steps[i] = float(step.item() if torch.is_tensor(step) else step)
            for key in STATE_KEYS:
                if key in state and key in self.state_flat:
                    self.view(self.state_flat[key], i).copy_(state[key])
        return self.state_views(i, amsgrad)

    # ---- gradients ---------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool) -> None:
        """Zeroes all gradients with one fill and keeps them as views (zero-copy).

        With set_to_none the gradients are "logically None": a parameter that
        autograd gives no gradient before the next step() is skipped by it, as
        torch.optim.AdamW skips a parameter whose .grad is None."""
        self.grad_flat.zero_()
        if _C.first_foreign_grad(self.params, self.grad_addresses) != -1:
            for p, view in zip(self.params, self.grad_views):
                if p.grad is not view:
                    p.grad = view
        self.arrived[:] = bytes(len(self.params))
        self.grads_logically_none = set_to_none

    def gather_grads(self) -> list[bool] | None:
        """Makes grad_flat hold this step's gradients; returns which parameters
        take part (None when all do, the common case, found without a
        per-parameter Python branch)."""
        # One C++ pass over the params (p.grad costs ~300 ns per access in Python).
        in_place = _C.first_foreign_grad(self.params, self.grad_addresses) == -1
        if in_place and (not self.grads_logically_none or 0 not in self.arrived):
            return None
        grads = [p.grad for p in self.params]
        active = []
        foreign_src, foreign_dst = [], []
        for i, (g, view) in enumerate(zip(grads, self.grad_views)):
            if g is None:
                active.append(False)
            elif g.data_ptr() == view.data_ptr():
                active.append(bool(self.arrived[i]) or not self.grads_logically_none)
            else:
                # Autograd or the user replaced the gradient (model.zero_grad(), p.grad = t,
                # create_graph=True): one copy into the buffer, and the view goes back in.
                if g.is_sparse:
                    raise RuntimeError(f"FusedAdamW does not support sparse gradients (parameter {i})")
                foreign_src.append(g)
                foreign_dst.append(view)
                active.append(True)
        if foreign_src:
            with torch.no_grad():
                torch._foreach_copy_(foreign_dst, foreign_src)
            for i, g in enumerate(grads):
                if g is not None and g.data_ptr() != self.grad_views[i].data_ptr():
                    self.params[i].grad = self.grad_views[i]
                    self.arrived[i] = 1
        return None if all(active) else active

    def mask_tensor(self, active: list[bool] | None) -> torch.Tensor | None:
        if active is None:
            return None
        return torch.tensor(active, dtype=torch.bool).to(self.device, non_blocking=True)

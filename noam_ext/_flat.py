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

# Codes of _C.grad_status, one byte per parameter.
GRAD_IS_VIEW, GRAD_IS_NONE, GRAD_IS_OTHER, PARAM_MOVED = 0, 1, 2, 3
# bytes.translate table: status -> 1 where the flat buffer holds this step's gradient.
_HOLDS_GRADIENT = bytes([1, 0, 1, 0]) + bytes(252)


class LayoutChanged(Exception):
    """A parameter no longer lives in its flat buffer (p.data was replaced,
    e.g. by module.to() or .half()): the layout must be rebuilt."""


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
    groups: tuple[int, ...]         # the param groups present, each once; the op's table has
                                    # one row per entry, and segments name rows of it
    offsets: list[int]
    length: int
    param_flat: torch.Tensor
    grad_flat: torch.Tensor
    grad_views: list[torch.Tensor]
    param_addresses: torch.Tensor   # int64 [n]: where each param view starts
    grad_addresses: torch.Tensor    # int64 [n]: where each grad view starts
    segments: torch.Tensor          # int64 [n, 3]: offset, numel, group, on the device
    param_steps: torch.Tensor       # float32 [n], torch's state["step"] of each param
    schedule_step: torch.Tensor     # int64 [2]: steps of the in-op schedule; scratch for the CUDA kernel
    state_flat: dict[str, torch.Tensor] = field(default_factory=dict)
    # Which gradients autograd delivered since the last zero_grad(set_to_none=True).
    arrived: bytearray = field(default_factory=bytearray)
    grads_logically_none: bool = False
    hooks: dict[int, object] = field(default_factory=dict)   # param index -> hook handle
    # Params with no optimizer state yet (they have not taken a step).
    stateless: set[int] = field(default_factory=set)
    _mask_cache: tuple = (None, None)
    _hyper_cache: tuple = (None, None)
    _idle_pattern: bytes | None = None   # an activity pattern that gave no param its first step

    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        p = self.params[i]
        return flat[self.offsets[i]:self.offsets[i] + p.numel()].view(p.shape)

    @classmethod
    def build(cls, params: list[torch.Tensor], group_index: list[int],
              arrival: dict[int, int] | None = None, logically_none: bool = False) -> "FlatBuffer":
        """Moves params (and any existing grads) into fresh flat buffers; the
        parameters become views into them. `arrival` carries, by id(param), which
        gradients had arrived in a previous layout. State is adopted separately."""
        device, dtype = params[0].device, params[0].dtype
        offsets, length = aligned_offsets([p.numel() for p in params], params[0].element_size())
        n = len(params)
        groups = tuple(sorted(set(group_index)))
        row_of = {g: row for row, g in enumerate(groups)}
        buffer = cls(
            device=device, dtype=dtype, params=list(params), group_index=list(group_index),
            groups=groups, offsets=offsets,
            length=length, param_flat=torch.zeros(length, device=device, dtype=dtype),
            grad_flat=torch.zeros(length, device=device, dtype=dtype), grad_views=[],
            param_addresses=torch.zeros(n, dtype=torch.int64), grad_addresses=torch.zeros(n, dtype=torch.int64),
            segments=segment_table(offsets, [p.numel() for p in params],
                                   [row_of[g] for g in group_index], length).to(device),
            param_steps=torch.zeros(n, dtype=torch.float32, device=device),
            schedule_step=torch.zeros(2, dtype=torch.int64, device=device),
            arrived=bytearray(n), grads_logically_none=logically_none, stateless=set(range(n)),
        )
        arrival = arrival or {}
        with torch.no_grad():
            for i, p in enumerate(params):
                slot = buffer.view(buffer.param_flat, i)
                slot.copy_(p)
                p.data = slot
                buffer.param_addresses[i] = slot.data_ptr()
                grad_view = buffer.view(buffer.grad_flat, i)
                buffer.grad_views.append(grad_view)
                buffer.grad_addresses[i] = grad_view.data_ptr()
                if p.grad is not None:
                    grad_view.copy_(p.grad)
                    p.grad = grad_view
                    buffer.arrived[i] = arrival.get(id(p), 1)
                    buffer.ensure_hook(i)
        return buffer

    def ensure_hook(self, i: int) -> None:
        """Registers the hook that records gradient arrival for param i, once,
        as soon as it can (a tensor must require grad to take the hook)."""
        p = self.params[i]
        if i in self.hooks or not p.requires_grad:
            return
        arrived = self.arrived  # the hook holds the bytearray, not the optimizer

        def mark(_param, _i=i):
            arrived[_i] = 1
        self.hooks[i] = p.register_post_accumulate_grad_hook(mark)

    def release(self) -> None:
        for handle in self.hooks.values():
            handle.remove()
        self.hooks.clear()

    def arrival(self) -> dict[int, int]:
        """id(param) -> whether its gradient counts as delivered (for a rebuild)."""
        return {id(p): (self.arrived[i] if self.grads_logically_none else 1) for i, p in enumerate(self.params)}

    # ---- state -------------------------------------------------------------------------

    def ensure_state_buffers(self, amsgrad: bool) -> None:
        for key in STATE_KEYS:
            if key == "max_exp_avg_sq" and not amsgrad:
                continue
            if key not in self.state_flat:
                self.state_flat[key] = torch.zeros(self.length, device=self.device, dtype=self.dtype)

    def state_views(self, i: int, amsgrad: bool) -> dict[str, torch.Tensor]:
        """The torch.optim.AdamW-format state of param i, as views into the buffers."""
        self.stateless.discard(i)
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

    def newly_stepped(self, active: bytes | None) -> list[int]:
        """Params without state that took part in the step just made. Costs
        nothing once every param has state, or while the same ones sit out."""
        if not self.stateless or (active is not None and active == self._idle_pattern):
            return []
        fresh = sorted(i for i in self.stateless if active is None or active[i])
        if not fresh:
            self._idle_pattern = active
        return fresh

    # ---- gradients ---------------------------------------------------------------------

    def grad_status(self) -> bytes:
        status = _C.grad_status(self.params, self.param_addresses, self.grad_addresses)
        if PARAM_MOVED in status:
            raise LayoutChanged
        return status

    def zero_grad(self, set_to_none: bool) -> None:
        """Zeroes all gradients with one fill and keeps them as views (zero-copy).
        A None gradient stays None, as in torch.

        With set_to_none the gradients are "logically None": a parameter that
        autograd gives no gradient before the next step() is skipped by it, as
        torch.optim.AdamW skips a parameter whose .grad is None."""
        status = self.grad_status()
        self.grad_flat.zero_()
        if GRAD_IS_OTHER in status:
            for i, code in enumerate(status):
                if code == GRAD_IS_OTHER:
                    self.params[i].grad = self.grad_views[i]
                    self.ensure_hook(i)
        self.arrived[:] = bytes(len(self.params))
        self.grads_logically_none = set_to_none

    def gather_grads(self) -> bytes | None:
        """Makes grad_flat hold this step's gradients; returns which parameters
        take part, one byte each (None when all do: the common case, decided by
        one C++ pass and no per-parameter Python)."""
        status = self.grad_status()
        n = len(self.params)
        if GRAD_IS_OTHER in status:
            # Autograd or the user replaced gradients (model.zero_grad(), p.grad = t,
            # create_graph=True): one copy into the buffer, and the views go back in.
            others = [i for i, code in enumerate(status) if code == GRAD_IS_OTHER]
            for i in others:
                if self.params[i].grad.is_sparse:
                    raise RuntimeError(f"FusedAdamW does not support sparse gradients (parameter {i})")
            with torch.no_grad():
                torch._foreach_copy_([self.grad_views[i] for i in others], [self.params[i].grad for i in others])
            for i in others:
                self.params[i].grad = self.grad_views[i]
                self.arrived[i] = 1
                self.ensure_hook(i)
        active = status.translate(_HOLDS_GRADIENT)
        if self.grads_logically_none:
            both = int.from_bytes(active, "little") & int.from_bytes(self.arrived, "little")
            active = both.to_bytes(n, "little")
        return None if 0 not in active else active

    def hyper_rows(self, table: torch.Tensor) -> torch.Tensor:
        """This buffer's rows of the optimizer's hyperparameter table (only its own
        groups, so that the CUDA launch carries few rows), cached per table."""
        source, rows = self._hyper_cache
        if source is not table:
            rows = table[list(self.groups)].contiguous()
            self._hyper_cache = (table, rows)
        return rows

    def mask_tensor(self, active: bytes | None) -> torch.Tensor | None:
        """The op's bool mask for an activity pattern, cached while the pattern holds."""
        if active is None:
            return None
        key, mask = self._mask_cache
        if key != active:
            mask = torch.frombuffer(bytearray(active), dtype=torch.uint8).to(torch.bool).to(self.device)
            self._mask_cache = (active, mask)
        return mask


def segment_table(offsets: list[int], numels: list[int], groups: list[int], length: int) -> torch.Tensor:
    """The op's segments table, checked here once (the CUDA op cannot afford to
    read it back from the device): in order and inside the buffers."""
    end = 0
    for i, (offset, numel) in enumerate(zip(offsets, numels)):
        if offset < end or offset + numel > length:
            raise AssertionError(f"flat layout: segment {i} (offset {offset}, numel {numel}) is invalid")
        end = offset + numel
    return torch.tensor([[o, k, g] for o, k, g in zip(offsets, numels, groups)], dtype=torch.int64).reshape(-1, 3)

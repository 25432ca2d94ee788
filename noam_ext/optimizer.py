"""FusedAdamW: a drop-in replacement for torch.optim.AdamW whose step() is one
fused op call per (device, dtype), with an optional Noam schedule computed
inside the op."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from . import _extension  # noqa: F401  (loads torch.ops.noam_ext)
from ._flat import (AMSGRAD, BETA1, BETA2, D_MODEL, EPS, LR, MAXIMIZE, NUM_HYPER_COLUMNS,
                    SUPPORTED_DTYPES, WARMUP, WEIGHT_DECAY, FlatBuffer, LayoutChanged)
from .scheduler import noam_lr, validate_noam_args

__all__ = ["FusedAdamW", "Noam"]

# Key under which state_dict() records the schedule's position (torch ignores unknown keys).
SCHEDULE_STEP_KEY = "noam_schedule_step"


@dataclass(frozen=True)
class Noam:
    """The Noam schedule, applied inside the fused op: each group's lr is its
    base lr times noam_lr(k - 1, d_model, warmup_steps) at the k-th step()."""

    d_model: int
    warmup_steps: int = 4000

    def __post_init__(self):
        d_model, warmup = validate_noam_args(self.d_model, self.warmup_steps)
        object.__setattr__(self, "d_model", d_model)
        object.__setattr__(self, "warmup_steps", warmup)

    def factor(self, completed_steps: int) -> float:
        return noam_lr(completed_steps, self.d_model, self.warmup_steps)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Invalid {name}: {value!r} is not a number") from None


def _check_hyperparameters(lr, betas, eps, weight_decay, where: str = "") -> None:
    """torch.optim.AdamW's checks and messages, plus NaN and type checks."""
    lr = _as_float("lr", lr)
    eps = _as_float("eps", eps)
    weight_decay = _as_float("weight_decay", weight_decay)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas{where}: {betas!r} must be a pair (beta1, beta2)")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate{where}: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value{where}: {eps}")
    for index, beta in enumerate(betas):
        beta = _as_float(f"beta{index + 1}", beta)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}{where}: {beta}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value{where}: {weight_decay}")


class FusedAdamW(Optimizer):
    """AdamW (decoupled weight decay, as torch.optim.AdamW) in one fused pass.

    Arguments, defaults, param groups, state_dict format and numerics follow
    torch.optim.AdamW. Additionally:

      schedule: a Noam(d_model, warmup_steps) makes the op compute each step's lr
        itself from a step counter on the parameters' device (no host sync). Each
        group's ``initial_lr`` is then its base lr and ``group["lr"]`` shows the lr
        the next step will use, exactly as with torch.optim.AdamW + TransformerLRScheduler.
        Without a schedule the op uses ``group["lr"]``, so any torch LR scheduler drives it.

    The parameters are moved into one flat buffer per (device, dtype) and become
    views into it (as do their gradients and state): construct the optimizer after
    moving the model to its device and dtype. See docs/adamw.md for the gradient rules.
    """

    # torch.amp.GradScaler.step() then hands us its scale and found-inf tensors
    # (self.grad_scale, self.found_inf) instead of unscaling the gradients itself;
    # the op reads both on the device: no sync, and an inf/NaN step changes nothing.
    _step_supports_amp_scaling = True

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, schedule: Noam | None = None, foreach: bool | None = None,
                 capturable: bool = False, differentiable: bool = False, fused: bool | None = None):
        _check_hyperparameters(lr, betas, eps, weight_decay)
        if differentiable:
            raise ValueError("FusedAdamW does not support differentiable=True")
        if schedule is not None and not isinstance(schedule, Noam):
            raise ValueError(f"schedule must be a noam_ext.Noam or None, got {schedule!r}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused, decoupled_weight_decay=True)
        self.schedule = schedule
        self._buffers: list[FlatBuffer] = []
        self._layout_dirty = True
        self._schedule_steps_done = 0   # host mirror of the op's counter, for logging
        self._hyper_cache: tuple | None = None
        self._hyper_table: torch.Tensor | None = None
        super().__init__(params, defaults)
        if schedule is not None:
            for group in self.param_groups:
                group.setdefault("initial_lr", group["lr"])
            self._refresh_scheduled_lrs()

    # ---- torch.optim.Optimizer interface -------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f" in param group {len(self.param_groups) - 1}"
        try:
            _check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"], where)
        except ValueError:
            self.param_groups.pop()   # leave the optimizer as it was
            raise
        for index, p in enumerate(group["params"]):
            name = f"parameter {index} of param group {len(self.param_groups) - 1} (shape {tuple(p.shape)})"
            if p.dtype not in SUPPORTED_DTYPES:
                self.param_groups.pop()
                raise ValueError(f"FusedAdamW: {name} has dtype {p.dtype}; supported: float32, "
                                 "float64, bfloat16, float16")
            if p.is_sparse or p.layout != torch.strided:
                self.param_groups.pop()
                raise ValueError(f"FusedAdamW: {name} is not a dense strided tensor")
        if self.schedule is not None:
            group.setdefault("initial_lr", group["lr"])
        self._layout_dirty = True

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["schedule"] = self.schedule
        state["_schedule_steps_done"] = self._current_schedule_position()
        return state

    def __setstate__(self, state: dict) -> None:
        # Also the path of copy.deepcopy and pickle: the flat buffers are not part of
        # the state; they are rebuilt (and the state adopted) on first use.
        state = dict(state)
        schedule = state.pop("schedule", None)
        done = state.pop("_schedule_steps_done", 0)
        super().__setstate__(state)
        self.schedule = getattr(self, "schedule", schedule)
        self._schedule_steps_done = getattr(self, "_schedule_steps_done", done)
        for name, value in (("_buffers", []), ("_layout_dirty", True), ("_hyper_cache", None),
                            ("_hyper_table", None)):
            if not hasattr(self, name):
                setattr(self, name, value)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group.setdefault("decoupled_weight_decay", True)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes the gradients with one fill per flat buffer; they stay views into it,
        so the next backward accumulates straight into the buffer (no copy in step()).

        set_to_none=True (the default, as in torch) keeps torch's meaning: a parameter
        that receives no gradient before the next step() is skipped by it, exactly as
        torch.optim.AdamW skips a parameter whose .grad is None. The one visible
        difference: such a parameter's .grad reads as zeros rather than None."""
        self._ensure_layout()
        try:
            for buffer in self._buffers:
                buffer.zero_grad(set_to_none)
        except LayoutChanged:
            self._layout_dirty = True
            self._ensure_layout()
            for buffer in self._buffers:
                buffer.zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._ensure_layout()
        hyper = self._hyper()  # validates every group before anything is touched
        try:
            actives = [buffer.gather_grads() for buffer in self._buffers]
        except LayoutChanged:
            # A parameter's .data was replaced (module.to(), .half(), p.data = ...):
            # lay the buffers out again around the parameters as they are now.
            self._layout_dirty = True
            self._ensure_layout()
            actives = [buffer.gather_grads() for buffer in self._buffers]
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for buffer, active in zip(self._buffers, actives):
            amsgrad = any(self.param_groups[g]["amsgrad"] for g in buffer.groups)
            buffer.ensure_state_buffers(amsgrad)
            torch.ops.noam_ext.fused_adamw_(
                buffer.param_flat, buffer.grad_flat, buffer.state_flat["exp_avg"],
                buffer.state_flat["exp_avg_sq"], buffer.state_flat.get("max_exp_avg_sq"),
                buffer.param_steps, buffer.schedule_step, buffer.segments, buffer.hyper_rows(hyper),
                buffer.mask_tensor(active),
                grad_scale=_on(grad_scale, buffer.device), found_inf=_on(found_inf, buffer.device))
            for i in buffer.newly_stepped(active):
                amsgrad_i = self.param_groups[buffer.group_index[i]]["amsgrad"]
                self.state[buffer.params[i]] = buffer.state_views(i, amsgrad_i)
        self._schedule_steps_done += 1
        if self.schedule is not None:
            self._refresh_scheduled_lrs()
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.schedule is not None:
            state[SCHEDULE_STEP_KEY] = self._current_schedule_position()
        return state

    def _current_schedule_position(self) -> int:
        """Completed steps of the schedule, read from the device counter (a sync,
        fine at checkpoint time): the host mirror misses CUDA-graph replays."""
        if self._buffers:   # still valid while a rebuild is pending
            self._schedule_steps_done = int(self._buffers[0].schedule_step[0].item())
        return self._schedule_steps_done

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._layout_dirty = True
        self._ensure_layout()
        if self.schedule is not None:
            steps = [float(s["step"]) for s in self.state.values() if "step" in s]
            done = state_dict.get(SCHEDULE_STEP_KEY, int(max(steps)) if steps else 0)
            self._set_schedule_position(int(done))
            for group in self.param_groups:
                group.setdefault("initial_lr", group["lr"])
            self._refresh_scheduled_lrs()

    # ---- schedule ----------------------------------------------------------------------------

    def get_last_lr(self) -> list[float]:
        """The lr each group's next step() will use (computed on the host: no sync)."""
        return [group["lr"] for group in self.param_groups]

    def _refresh_scheduled_lrs(self) -> None:
        factor = self.schedule.factor(self._schedule_steps_done)
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * factor

    def _set_schedule_position(self, done: int) -> None:
        self._schedule_steps_done = done
        for buffer in self._buffers:
            buffer.schedule_step[0] = done

    # ---- layout and state ----------------------------------------------------------------------

    def _ensure_layout(self) -> None:
        if not self._layout_dirty:
            return
        self._current_schedule_position()   # a rebuild starts from the device counter
        arrival, logically_none = {}, False
        for buffer in self._buffers:
            arrival.update(buffer.arrival())
            logically_none |= buffer.grads_logically_none
            buffer.release()
        members: dict[tuple, tuple[list, list]] = defaultdict(lambda: ([], []))
        for group_index, group in enumerate(self.param_groups):
            for p in group["params"]:
                params, groups = members[(p.device, p.dtype)]
                params.append(p)
                groups.append(group_index)
        for device, _ in members:
            if not torch._C._dispatch_has_kernel_for_dispatch_key("noam_ext::fused_adamw_", device.type.upper()):
                raise RuntimeError(
                    f"FusedAdamW: this build of noam_ext has no {device.type} implementation "
                    f"(build info: {_extension.build_info()}); parameters on {device} cannot be optimised")
        self._buffers = [FlatBuffer.build(params, groups, arrival, logically_none)
                         for params, groups in members.values()]
        for buffer in self._buffers:
            buffer.schedule_step[0] = self._schedule_steps_done
            for i, p in enumerate(buffer.params):
                if self.state.get(p):
                    amsgrad = self.param_groups[buffer.group_index[i]]["amsgrad"]
                    self.state[p] = buffer.adopt_state(i, self.state[p], amsgrad)
        self._layout_dirty = False

    def _hyper(self) -> torch.Tensor:
        """The per-group hyperparameter table for the op, rebuilt only when a group changed."""
        rows = []
        for index, group in enumerate(self.param_groups):
            base_lr = group["initial_lr"] if self.schedule is not None else group["lr"]
            # float(): a tensor lr changed in place (as torch's schedulers do) must change the key.
            betas = group["betas"] if isinstance(group["betas"], (tuple, list)) else (group["betas"],)
            rows.append(tuple(_plain(v) for v in (base_lr, *betas, group["eps"], group["weight_decay"]))
                        + (bool(group["amsgrad"]), bool(group["maximize"])))
        key = tuple(rows)
        if key != self._hyper_cache:
            table = torch.zeros(len(rows), NUM_HYPER_COLUMNS, dtype=torch.float64)
            for index, row in enumerate(rows):
                *numbers, amsgrad, maximize = row
                where = f" in param group {index}"
                _check_hyperparameters(numbers[0], tuple(numbers[1:-2]), numbers[-2], numbers[-1], where)
                values = [float(v) for v in numbers]   # the check above made sure they convert
                if not all(math.isfinite(v) for v in values):
                    raise ValueError(f"Invalid hyperparameters{where}: {values} must be finite")
                table[index, LR], table[index, BETA1], table[index, BETA2] = values[:3]
                table[index, EPS], table[index, WEIGHT_DECAY] = values[3:]
                if self.schedule is not None:
                    table[index, D_MODEL] = self.schedule.d_model
                    table[index, WARMUP] = self.schedule.warmup_steps
                table[index, AMSGRAD] = float(amsgrad)
                table[index, MAXIMIZE] = float(maximize)
            self._hyper_cache, self._hyper_table = key, table
        return self._hyper_table


def _plain(value: Any) -> Any:
    """A tensor hyperparameter as a Python float (a sync for a GPU tensor: prefer floats)."""
    return value.item() if isinstance(value, torch.Tensor) else value


def _on(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    if tensor is None:
        return None
    return tensor.to(device=device, dtype=torch.float32, non_blocking=True).reshape(1)

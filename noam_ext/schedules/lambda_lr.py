"""The schedules as torch LR schedulers (LambdaLR), for any torch.optim optimizer:
the host twins of the schedules FusedAdamW evaluates in the op.

In the usual loop

    for batch in data:
        loss = model(batch); loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

the k-th optimizer.step() runs with initial_lr * schedule.factor(k - 1), which is
exactly the lr of the k-th FusedAdamW(schedule=schedule).step().
"""

from __future__ import annotations

import copy
import numbers

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from .definitions import (Noam, Schedule, WarmupConstant, WarmupCosine, WarmupInverseSqrt, WarmupLinear,
                          WarmupStableDecay)

__all__ = ["ScheduleLR", "TransformerLRScheduler", "WarmupConstantLR", "WarmupLinearLR", "WarmupCosineLR",
           "WarmupStableDecayLR", "WarmupInverseSqrtLR"]


class ScheduleLR(LambdaLR):
    """LambdaLR with any noam_ext schedule (Noam included): each group's lr is its
    initial_lr times schedule.factor(last_epoch).

    The scheduler keeps a copy of the schedule as its lr_lambda, so its
    state_dict() is plain data (the schedule's settings, as for any callable
    object), and load_state_dict() restores the saved settings into that copy, as
    LambdaLR does; the schedule passed in is never changed."""

    def __init__(self, optimizer: Optimizer, schedule: Schedule, last_epoch: int = -1):
        if not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be a noam_ext schedule (noam_ext.schedules), got {schedule!r}")
        if isinstance(last_epoch, bool) or not isinstance(last_epoch, numbers.Integral) or last_epoch < -1:
            raise ValueError(f"last_epoch must be an integer >= -1, got {last_epoch!r}")
        super().__init__(optimizer, copy.copy(schedule), last_epoch=int(last_epoch))

    @property
    def schedule(self) -> Schedule:
        return self.lr_lambdas[0]


class TransformerLRScheduler(ScheduleLR):
    """ScheduleLR(optimizer, Noam(d_model, warmup_steps)): each group's lr becomes
    initial_lr * noam_lr(last_epoch, d_model, warmup_steps). Use lr=1.0 for the paper's
    schedule; the k-th optimizer.step() of the usual loop runs with noam_lr(k - 1)."""

    def __init__(self, optimizer: Optimizer, d_model: int, warmup_steps: int = 4000, last_epoch: int = -1):
        schedule = Noam(d_model, warmup_steps)   # checked before LambdaLR evaluates it
        self.d_model, self.warmup_steps = schedule.d_model, schedule.warmup_steps
        super().__init__(optimizer, schedule, last_epoch)


class WarmupConstantLR(ScheduleLR):
    """ScheduleLR(optimizer, WarmupConstant(warmup_steps))."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int, last_epoch: int = -1):
        super().__init__(optimizer, WarmupConstant(warmup_steps), last_epoch)


class WarmupLinearLR(ScheduleLR):
    """ScheduleLR(optimizer, WarmupLinear(warmup_steps, total_steps, min_lr_ratio))."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0,
                 last_epoch: int = -1):
        super().__init__(optimizer, WarmupLinear(warmup_steps, total_steps, min_lr_ratio), last_epoch)


class WarmupCosineLR(ScheduleLR):
    """ScheduleLR(optimizer, WarmupCosine(warmup_steps, total_steps, min_lr_ratio, num_cycles))."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0,
                 num_cycles: float = 0.5, last_epoch: int = -1):
        super().__init__(optimizer, WarmupCosine(warmup_steps, total_steps, min_lr_ratio, num_cycles), last_epoch)


class WarmupStableDecayLR(ScheduleLR):
    """ScheduleLR(optimizer, WarmupStableDecay(warmup_steps, stable_steps, decay_steps, decay, min_lr_ratio))."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int, stable_steps: int, decay_steps: int,
                 decay: str = "linear", min_lr_ratio: float = 0.0, last_epoch: int = -1):
        super().__init__(optimizer, WarmupStableDecay(warmup_steps, stable_steps, decay_steps, decay, min_lr_ratio),
                         last_epoch)


class WarmupInverseSqrtLR(ScheduleLR):
    """ScheduleLR(optimizer, WarmupInverseSqrt(warmup_steps, timescale, min_lr_ratio))."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int, timescale: int | None = None,
                 min_lr_ratio: float = 0.0, last_epoch: int = -1):
        super().__init__(optimizer, WarmupInverseSqrt(warmup_steps, timescale, min_lr_ratio), last_epoch)

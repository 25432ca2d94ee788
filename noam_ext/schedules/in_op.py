"""InOpScheduleLR: the LR scheduler to hand a trainer when FusedAdamW computes the
lr itself (schedule=noam_ext.Noam(...)).

Trainers want a scheduler: HF Trainer builds one (linear by default) when it is
given none, and logs its get_last_lr(). Next to an in-op schedule any scheduler
that writes group["lr"] is refused by step(). This one writes nothing: its
get_lr() is the optimizer's mirror of the lr the op uses next, so get_last_lr()
and the trainer's logs show the lr that was really used. For HF Trainer:

    optimizer = noam_ext.FusedAdamW(params, lr=1.0, schedule=noam_ext.Noam(512, 4000))
    trainer = Trainer(..., optimizers=(optimizer, noam_ext.InOpScheduleLR(optimizer)))
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["InOpScheduleLR"]


def _with_in_op_schedule(optimizer) -> Optimizer:
    """The optimizer whose schedule computes the lr: optimizer itself, or the one a
    wrapper holds (accelerate's AcceleratedOptimizer keeps it as .optimizer)."""
    inner = optimizer
    while inner is not None:
        if getattr(inner, "schedule", None) is not None:
            return inner
        inner = getattr(inner, "optimizer", None)
    raise ValueError(
        f"InOpScheduleLR needs a noam_ext.FusedAdamW with an in-op schedule (schedule=noam_ext.Noam(...)); "
        f"got {type(optimizer).__name__} without one. Without schedule=, FusedAdamW uses group[\"lr\"] as it "
        "is: drive it with any torch LR scheduler (noam_ext.TransformerLRScheduler for the Noam schedule).")


class InOpScheduleLR(LRScheduler):
    """A torch LR scheduler that reports the in-op schedule's lr and writes nothing.

    get_last_lr() (after construction and after each step()) is, per param group,
    the lr the next optimizer.step() uses: the same values, step for step, as
    torch.optim.AdamW + TransformerLRScheduler with the same base lrs. step() only
    counts; it never writes group["lr"]. state_dict() is plain data, as for any
    torch scheduler.

    The lr is read from the optimizer's host-side mirror, which does not advance
    inside a compiled step or a CUDA-graph replay (the device counters do).
    """

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1):
        _with_in_op_schedule(optimizer)   # checked first: a clear error instead of a constant lr
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float | torch.Tensor]:
        lrs = _with_in_op_schedule(self.optimizer).get_last_lr()
        return [lr.clone() if isinstance(lr, torch.Tensor) else lr for lr in lrs]

    def step(self, epoch: int | None = None) -> None:
        # Not LRScheduler.step(): that writes get_lr() into group["lr"], which is the
        # optimizer's to write (a Tensor lr filled in place would read as an outside write).
        self._step_count += 1
        self.last_epoch = self.last_epoch + 1 if epoch is None else epoch
        self._last_lr = self.get_lr()

"""The Noam learning-rate schedule of "Attention Is All You Need".

    lr(step) = base_lr * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)

With base_lr = 1 this is the paper's schedule: a linear warm-up to a peak at
step == warmup_steps (about 6.99e-4 for d_model=512, warmup=4000), then decay
with the inverse square root of the step.
"""

from __future__ import annotations

import numbers

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["noam_lr", "noam_peak_lr", "TransformerLRScheduler", "validate_noam_args"]


def _check_positive_int(name: str, value) -> int:
    # bool is an int subclass, and True is not a sensible d_model.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    if value > 2**53:
        # The op computes the schedule in float64, where larger integers are not exact.
        raise ValueError(f"{name} must be at most 2**53, got {value}")
    return int(value)


def validate_noam_args(d_model, warmup_steps) -> tuple[int, int]:
    """Checks d_model and warmup_steps; raises ValueError naming the bad one."""
    return _check_positive_int("d_model", d_model), _check_positive_int("warmup_steps", warmup_steps)


def noam_lr(step: int, d_model: int, warmup_steps: int) -> float:
    """The Noam factor at `step`: d_model^-0.5 * min(s^-0.5, s * warmup^-1.5), s = max(step, 1).

    Step 0 is treated as step 1 (0^-0.5 is undefined), so noam_lr(0) == noam_lr(1).
    The fused op evaluates the same expression with the same pow() calls
    (csrc/noam_ext/adamw_math.h, noam_lambda), so the two agree bit for bit on the CPU.
    """
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    d_model, warmup_steps = validate_noam_args(d_model, warmup_steps)
    s = float(max(int(step), 1))
    return float(d_model) ** -0.5 * min(s ** -0.5, s * float(warmup_steps) ** -1.5)


def noam_peak_lr(d_model: int, warmup_steps: int) -> float:
    """The largest value of the schedule, reached at step == warmup_steps."""
    return noam_lr(warmup_steps, d_model, warmup_steps)


class _NoamLambda:
    """A picklable lr_lambda. LambdaLR.state_dict() keeps only callable objects
    (not plain functions or lambdas), so this one is saved with its settings and
    a resumed scheduler is checked against them."""

    def __init__(self, d_model: int, warmup_steps: int):
        self.d_model = d_model
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        return noam_lr(step, self.d_model, self.warmup_steps)


class TransformerLRScheduler(LambdaLR):
    """LambdaLR with the Noam schedule; works with any torch.optim optimizer.

    Each param group's lr becomes initial_lr * noam_lr(last_epoch, d_model, warmup_steps).
    Use lr=1.0 for the paper's schedule. The usual loop is

        for batch in data:
            loss = model(batch); loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()

    so the k-th optimizer.step() runs with noam_lr(k - 1) (with noam_lr(0) == noam_lr(1)).
    """

    def __init__(self, optimizer: Optimizer, d_model: int, warmup_steps: int = 4000,
                 last_epoch: int = -1):
        # The course version called LambdaLR.__init__ first, which evaluates the
        # lambda before d_model exists. Validate and store first.
        self.d_model, self.warmup_steps = validate_noam_args(d_model, warmup_steps)
        if isinstance(last_epoch, bool) or not isinstance(last_epoch, numbers.Integral) or last_epoch < -1:
            raise ValueError(f"last_epoch must be an integer >= -1, got {last_epoch!r}")
        super().__init__(optimizer, _NoamLambda(self.d_model, self.warmup_steps), last_epoch=last_epoch)

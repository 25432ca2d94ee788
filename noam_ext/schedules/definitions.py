"""The learning-rate schedules FusedAdamW evaluates inside the op, and their
pure-Python definitions (which are also the host twins).

Noam's, from "Attention Is All You Need":

    lr(step) = base_lr * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)

With base_lr = 1 this is the paper's schedule: a linear warm-up to a peak at
step == warmup_steps (about 6.99e-4 for d_model=512, warmup=4000), then decay with
the inverse square root of the step; step 0 counts as step 1 (0^-0.5 is undefined).

Each schedule is a frozen dataclass whose factor(k) is the multiplier of the base
lr in the step that follows k completed steps: the k-th step() (k counted from 1)
uses factor(k - 1), as LambdaLR's last_epoch is k - 1 at the k-th
optimizer.step() of the usual loop. Each is also callable (the same factor), so it
is a LambdaLR lr_lambda (lambda_lr.py has a LambdaLR for each), and it
hands the op its settings as one block of the hyperparameter table.

    Noam(d_model, warmup_steps)                   "Attention Is All You Need"
    WarmupConstant(warmup_steps)                  HF get_constant_schedule_with_warmup
    WarmupLinear(warmup_steps, total_steps, ...)  HF get_linear_schedule_with_warmup, plus a floor
    WarmupCosine(warmup_steps, total_steps, ...)  HF get_cosine_with_min_lr_schedule_with_warmup
    WarmupStableDecay(warmup, stable, decay, ...) HF get_wsd_schedule, plus Megatron-LM's exponential decay
    WarmupInverseSqrt(warmup_steps, ...)          HF get_inverse_sqrt_schedule, plus a floor

The factors are written as the same double expressions, in the same order and
with the same math functions, as csrc/noam_ext/schedule_math.h evaluates them, so
that on the CPU the op and these functions agree bit for bit; within the range
where HF defines them, they are also HF's bits. docs/adamw.md has the formulas and
where HF, Megatron-LM and torchtitan differ.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .._layout import table_layout

__all__ = [
    "Schedule", "Noam", "WarmupConstant", "WarmupLinear", "WarmupCosine", "WarmupStableDecay",
    "WarmupInverseSqrt", "noam_lr", "noam_peak_lr", "warmup_constant_lr", "warmup_linear_lr",
    "warmup_cosine_lr", "wsd_lr", "warmup_inverse_sqrt_lr", "DECAY_SHAPES",
]

# WSD's decay shapes, as users name them (and the pure functions below evaluate them).
# Where each sits in the op's table, as every column and schedule kind, the op says
# (noam_ext._layout, from csrc/noam_ext/schedule_math.h).
DECAY_SHAPES = ("linear", "cosine", "1-sqrt", "exponential")

_MAX_STEPS = 2**53   # steps are doubles in the op: larger whole numbers are not exact


class Schedule:
    """Base of the schedules that FusedAdamW(schedule=...) evaluates inside the op."""

    _KIND = "none"   # the op's name of the schedule kind (schedule_math.h, kScheduleKindNames)

    def factor(self, completed_steps: int) -> float:
        """The multiplier of the base lr in the step after `completed_steps` steps."""
        return self._factor(float(_check_step(completed_steps)))

    def __call__(self, step: int) -> float:
        return self.factor(step)

    def table_block(self) -> list[float]:
        """The settings as the op's hyperparameter table holds them: its schedule block, laid
        out as the op says (noam_ext._layout); the settings this kind does not read are 0."""
        layout = table_layout()
        columns = layout["schedule_columns"]
        block = [0.0] * layout["num_schedule_columns"]
        block[columns["kind"]] = float(layout["schedule_kinds"][self._KIND])
        for name, value in self._settings().items():
            if name == "decay_shape":
                value = layout["decay_shapes"].index(value)
            block[columns[name]] = float(value)
        return block

    def _factor(self, k: float) -> float:
        raise NotImplementedError

    def _settings(self) -> dict[str, float | str]:
        raise NotImplementedError


@dataclass(frozen=True)
class Noam(Schedule):
    """The Noam schedule, applied inside the fused op: each group's lr is its
    base lr times noam_lr(k - 1, d_model, warmup_steps) at the k-th step()."""

    d_model: int
    warmup_steps: int = 4000
    _KIND = "noam"

    def __post_init__(self):
        _set(self, "d_model", _steps("d_model", self.d_model, positive=True))
        _set(self, "warmup_steps", _steps("warmup_steps", self.warmup_steps, positive=True))

    def _factor(self, k: float) -> float:
        # The same pow() calls as the op (csrc/noam_ext/schedule_math.h): the same bits on the CPU.
        s = max(k, 1.0)
        return float(self.d_model) ** -0.5 * min(s ** -0.5, s * float(self.warmup_steps) ** -1.5)

    def _settings(self) -> dict[str, float | str]:
        return {"d_model": self.d_model, "warmup_steps": self.warmup_steps}


@dataclass(frozen=True)
class WarmupConstant(Schedule):
    """k / warmup_steps for k < warmup_steps, then 1 (HF get_constant_schedule_with_warmup)."""

    warmup_steps: int
    _KIND = "warmup_constant"

    def __post_init__(self):
        _set(self, "warmup_steps", _steps("warmup_steps", self.warmup_steps))

    def _factor(self, k: float) -> float:
        if k < self.warmup_steps:
            return k / self.warmup_steps
        return 1.0

    def _settings(self) -> dict[str, float | str]:
        return {"warmup_steps": self.warmup_steps}


@dataclass(frozen=True)
class WarmupLinear(Schedule):
    """k / warmup_steps for k < warmup_steps, then a straight line from 1 to
    min_lr_ratio at k = total_steps, where it stays (HF get_linear_schedule_with_warmup,
    whose floor is 0; Megatron-LM's "linear" with min_lr = min_lr_ratio * lr)."""

    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.0
    _KIND = "warmup_linear"

    def __post_init__(self):
        warmup = _set(self, "warmup_steps", _steps("warmup_steps", self.warmup_steps))
        _set(self, "total_steps", _steps("total_steps", self.total_steps, above=warmup, above_name="warmup_steps"))
        _set(self, "min_lr_ratio", _ratio("min_lr_ratio", self.min_lr_ratio))

    def _factor(self, k: float) -> float:
        if k < self.warmup_steps:
            return k / self.warmup_steps
        if k < self.total_steps:
            return _above_floor((self.total_steps - k) / (self.total_steps - self.warmup_steps), self.min_lr_ratio)
        return self.min_lr_ratio

    def _settings(self) -> dict[str, float | str]:
        return {"warmup_steps": self.warmup_steps, "decay_start": self.warmup_steps, "decay_end": self.total_steps,
                "min_lr_ratio": self.min_lr_ratio}


@dataclass(frozen=True)
class WarmupCosine(Schedule):
    """k / warmup_steps for k < warmup_steps, then a cosine from 1 to min_lr_ratio
    over num_cycles waves (0.5: one half-cosine) until k = total_steps, then
    min_lr_ratio (HF get_cosine_with_min_lr_schedule_with_warmup with min_lr_rate;
    get_cosine_schedule_with_warmup is min_lr_ratio=0)."""

    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.0
    num_cycles: float = 0.5
    _KIND = "warmup_cosine"

    def __post_init__(self):
        warmup = _set(self, "warmup_steps", _steps("warmup_steps", self.warmup_steps))
        _set(self, "total_steps", _steps("total_steps", self.total_steps, above=warmup, above_name="warmup_steps"))
        _set(self, "min_lr_ratio", _ratio("min_lr_ratio", self.min_lr_ratio))
        _set(self, "num_cycles", _positive("num_cycles", self.num_cycles))

    def _factor(self, k: float) -> float:
        if k < self.warmup_steps:
            return k / self.warmup_steps
        if k < self.total_steps:
            progress = (k - self.warmup_steps) / (self.total_steps - self.warmup_steps)
            return _above_floor(_cosine_wave(progress, self.num_cycles), self.min_lr_ratio)
        return self.min_lr_ratio

    def _settings(self) -> dict[str, float | str]:
        return {"warmup_steps": self.warmup_steps, "decay_start": self.warmup_steps, "decay_end": self.total_steps,
                "min_lr_ratio": self.min_lr_ratio, "num_cycles": self.num_cycles}


@dataclass(frozen=True)
class WarmupStableDecay(Schedule):
    """Warmup-stable-decay (WSD): from min_lr_ratio to 1 over warmup_steps, 1 for
    stable_steps, down to min_lr_ratio over decay_steps along `decay`, then
    min_lr_ratio (HF get_wsd_schedule with a linear warmup; decay "linear",
    "cosine" and "1-sqrt" as HF's, "exponential" as Megatron-LM's 2 * 0.5^p - 1)."""

    warmup_steps: int
    stable_steps: int
    decay_steps: int
    decay: str = "linear"
    min_lr_ratio: float = 0.0
    _KIND = "warmup_stable_decay"

    def __post_init__(self):
        _set(self, "warmup_steps", _steps("warmup_steps", self.warmup_steps))
        _set(self, "stable_steps", _steps("stable_steps", self.stable_steps))
        _set(self, "decay_steps", _steps("decay_steps", self.decay_steps, above=0, above_name="0"))
        if self.decay not in DECAY_SHAPES:
            raise ValueError(f"decay must be one of {', '.join(DECAY_SHAPES)}; got {self.decay!r}")
        _set(self, "min_lr_ratio", _ratio("min_lr_ratio", self.min_lr_ratio))
        if self.warmup_steps + self.stable_steps + self.decay_steps > _MAX_STEPS:
            raise ValueError("warmup_steps + stable_steps + decay_steps must be at most 2**53")

    def _factor(self, k: float) -> float:
        if k < self.warmup_steps:
            return _above_floor(k / self.warmup_steps, self.min_lr_ratio)
        start = self.warmup_steps + self.stable_steps
        if k < start:
            return 1.0
        end = start + self.decay_steps
        if k < end:
            return _above_floor(_wsd_decay(self.decay, (k - start) / (end - start)), self.min_lr_ratio)
        return self.min_lr_ratio

    def _settings(self) -> dict[str, float | str]:
        start = self.warmup_steps + self.stable_steps
        return {"warmup_steps": self.warmup_steps, "decay_start": start, "decay_end": start + self.decay_steps,
                "min_lr_ratio": self.min_lr_ratio, "decay_shape": self.decay}


@dataclass(frozen=True)
class WarmupInverseSqrt(Schedule):
    """k / warmup_steps for k < warmup_steps, then 1 / sqrt((k + timescale -
    warmup_steps) / timescale), never below min_lr_ratio (HF get_inverse_sqrt_schedule,
    whose timescale defaults to warmup_steps, or 10000 without warmup; with
    timescale == warmup_steps it is Megatron-LM's "inverse-square-root",
    sqrt(warmup / k))."""

    warmup_steps: int
    timescale: int | None = None
    min_lr_ratio: float = 0.0
    _KIND = "warmup_inverse_sqrt"

    def __post_init__(self):
        warmup = _set(self, "warmup_steps", _steps("warmup_steps", self.warmup_steps))
        timescale = (warmup or 10_000) if self.timescale is None else self.timescale
        _set(self, "timescale", _steps("timescale", timescale, above=0, above_name="0"))
        _set(self, "min_lr_ratio", _ratio("min_lr_ratio", self.min_lr_ratio))

    def _factor(self, k: float) -> float:
        if k < self.warmup_steps:
            return k / self.warmup_steps
        decay = 1.0 / math.sqrt((k + (self.timescale - self.warmup_steps)) / self.timescale)
        return self.min_lr_ratio if decay < self.min_lr_ratio else decay

    def _settings(self) -> dict[str, float | str]:
        return {"warmup_steps": self.warmup_steps, "timescale": self.timescale, "min_lr_ratio": self.min_lr_ratio}


# ---- the pure functions (each builds the schedule, so its arguments are checked) -----------------

def noam_lr(step: int, d_model: int, warmup_steps: int) -> float:
    """Noam(d_model, warmup_steps).factor(step): d_model^-0.5 * min(s^-0.5, s * warmup^-1.5),
    s = max(step, 1), so noam_lr(0) == noam_lr(1)."""
    return Noam(d_model, warmup_steps).factor(step)


def noam_peak_lr(d_model: int, warmup_steps: int) -> float:
    """The largest value of the Noam schedule, reached at step == warmup_steps."""
    return noam_lr(warmup_steps, d_model, warmup_steps)


def warmup_constant_lr(step: int, warmup_steps: int) -> float:
    """WarmupConstant(warmup_steps).factor(step)."""
    return WarmupConstant(warmup_steps).factor(step)


def warmup_linear_lr(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """WarmupLinear(warmup_steps, total_steps, min_lr_ratio).factor(step)."""
    return WarmupLinear(warmup_steps, total_steps, min_lr_ratio).factor(step)


def warmup_cosine_lr(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0,
                     num_cycles: float = 0.5) -> float:
    """WarmupCosine(warmup_steps, total_steps, min_lr_ratio, num_cycles).factor(step)."""
    return WarmupCosine(warmup_steps, total_steps, min_lr_ratio, num_cycles).factor(step)


def wsd_lr(step: int, warmup_steps: int, stable_steps: int, decay_steps: int, decay: str = "linear",
           min_lr_ratio: float = 0.0) -> float:
    """WarmupStableDecay(warmup_steps, stable_steps, decay_steps, decay, min_lr_ratio).factor(step)."""
    return WarmupStableDecay(warmup_steps, stable_steps, decay_steps, decay, min_lr_ratio).factor(step)


def warmup_inverse_sqrt_lr(step: int, warmup_steps: int, timescale: int | None = None,
                           min_lr_ratio: float = 0.0) -> float:
    """WarmupInverseSqrt(warmup_steps, timescale, min_lr_ratio).factor(step)."""
    return WarmupInverseSqrt(warmup_steps, timescale, min_lr_ratio).factor(step)


# ---- the shared pieces, as schedule_math.h writes them ------------------------------------------

def _above_floor(f: float, floor: float) -> float:
    return f * (1.0 - floor) + floor


def _cosine_wave(progress: float, cycles: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * cycles * 2.0 * progress))


def _wsd_decay(shape: str, progress: float) -> float:
    if shape == "cosine":
        return _cosine_wave(progress, 0.5)
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(progress)
    if shape == "exponential":
        return 2.0 * math.pow(0.5, progress) - 1.0
    return 1.0 - progress


# ---- argument checks (ValueError naming the argument) ---------------------------------------------

def _set(schedule: Schedule, name: str, value):
    object.__setattr__(schedule, name, value)
    return value


def _check_step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or not 0 <= step <= _MAX_STEPS:
        raise ValueError(f"step must be an integer in [0, 2**53], got {step!r}")
    return int(step)


def _steps(name: str, value, above: int | None = None, above_name: str = "", positive: bool = False) -> int:
    """A whole number of steps in [0, 2**53] (bool is an int, but not a step count; the op
    computes in float64, where larger integers are not exact); positive: at least 1; with
    `above`, larger than it."""
    kind = "positive" if positive else "non-negative"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a {kind} integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if value < (1 if positive else 0):
        raise ValueError(f"{name} must be a {kind} integer, got {value}")
    if value > _MAX_STEPS:
        raise ValueError(f"{name} must be at most 2**53, got {value}")
    if above is not None and value <= above:
        raise ValueError(f"{name} must be larger than {above_name} ({above}), got {value}")
    return value


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _ratio(name: str, value) -> float:
    value = _real(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def _positive(name: str, value) -> float:
    value = _real(name, value)
    if not value > 0.0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value

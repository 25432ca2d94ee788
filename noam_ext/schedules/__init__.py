"""Learning-rate schedules, in the three forms users meet them:

- the schedules FusedAdamW evaluates inside the op (FusedAdamW(schedule=...)), which
  are also their pure functions: definitions.py (Noam, WarmupConstant, WarmupLinear,
  WarmupCosine, WarmupStableDecay, WarmupInverseSqrt; noam_lr, warmup_cosine_lr, ...);
- torch LR schedulers (LambdaLR) of the same schedules, for any optimizer:
  lambda_lr.py (ScheduleLR, TransformerLRScheduler for Noam, WarmupCosineLR, ...);
- the scheduler to hand a trainer when the op computes the lr: in_op.py (InOpScheduleLR),
  and the check that nothing else writes group["lr"] then: lr_mirror.py."""

from .definitions import (DECAY_SHAPES, Noam, Schedule, WarmupConstant, WarmupCosine, WarmupInverseSqrt,
                          WarmupLinear, WarmupStableDecay, noam_lr, noam_peak_lr, warmup_constant_lr,
                          warmup_cosine_lr, warmup_inverse_sqrt_lr, warmup_linear_lr, wsd_lr)
from .in_op import InOpScheduleLR
from .lambda_lr import (ScheduleLR, TransformerLRScheduler, WarmupConstantLR, WarmupCosineLR, WarmupInverseSqrtLR,
                        WarmupLinearLR, WarmupStableDecayLR)

__all__ = [
    "Schedule", "Noam", "WarmupConstant", "WarmupLinear", "WarmupCosine", "WarmupStableDecay", "WarmupInverseSqrt",
    "DECAY_SHAPES", "noam_lr", "noam_peak_lr", "warmup_constant_lr", "warmup_linear_lr", "warmup_cosine_lr",
    "wsd_lr", "warmup_inverse_sqrt_lr", "ScheduleLR", "TransformerLRScheduler", "WarmupConstantLR",
    "WarmupLinearLR", "WarmupCosineLR", "WarmupStableDecayLR", "WarmupInverseSqrtLR", "InOpScheduleLR",
]

# Pickles (and reprs) name the classes where users import them, so that they load
# whatever module inside this package defines them.
for _name in __all__:
    _value = globals()[_name]
    if isinstance(_value, type):
        _value.__module__ = __name__
del _name, _value

"""noam_ext: fused, exact AdamW with its learning-rate schedule (Noam, warmup + cosine,
linear, warmup-stable-decay, inverse square root, constant) computed inside the op."""

from .param_groups import param_groups
from .schedules import (InOpScheduleLR, Noam, Schedule, ScheduleLR, TransformerLRScheduler, WarmupConstant,
                        WarmupConstantLR, WarmupCosine, WarmupCosineLR, WarmupInverseSqrt, WarmupInverseSqrtLR,
                        WarmupLinear, WarmupLinearLR, WarmupStableDecay, WarmupStableDecayLR, noam_lr, noam_peak_lr,
                        warmup_constant_lr, warmup_cosine_lr, warmup_inverse_sqrt_lr, warmup_linear_lr, wsd_lr)

__all__ = [
    "FusedAdamW",
    "dequantized_state_dict",
    "InOpScheduleLR",
    "param_groups",
    "build_info",
    "cpu_capability",
    # The schedules FusedAdamW evaluates in the op (noam_ext.schedules) ...
    "Schedule",
    "Noam",
    "WarmupConstant",
    "WarmupLinear",
    "WarmupCosine",
    "WarmupStableDecay",
    "WarmupInverseSqrt",
    # ... as pure functions ...
    "noam_lr",
    "noam_peak_lr",
    "warmup_constant_lr",
    "warmup_linear_lr",
    "warmup_cosine_lr",
    "wsd_lr",
    "warmup_inverse_sqrt_lr",
    # ... and as torch LR schedulers, for any optimizer.
    "TransformerLRScheduler",
    "ScheduleLR",
    "WarmupConstantLR",
    "WarmupLinearLR",
    "WarmupCosineLR",
    "WarmupStableDecayLR",
    "WarmupInverseSqrtLR",
]

__version__ = "0.1.0"

# Importing the package loads the compiled extension, which registers
# torch.ops.noam_ext.*. Where it cannot be loaded (e.g. a source checkout that was
# never built), the pure-Python parts (the schedules, param_groups) still
# work, and the names that need it raise the extension's import error when used.
try:
    from . import _extension  # noqa: F401
except ImportError:
    pass

_COMPILED = {"FusedAdamW": ".optimizer", "dequantized_state_dict": "._checkpoint", "build_info": "._extension",
             "cpu_capability": "._extension"}


def __getattr__(name: str):
    if name in _COMPILED:
        import importlib

        value = getattr(importlib.import_module(_COMPILED[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'noam_ext' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))

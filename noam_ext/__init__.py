"""noam_ext: fused, exact AdamW with the Noam learning-rate schedule for PyTorch."""

from .in_op_schedule_lr import InOpScheduleLR
from .param_groups import param_groups
from .scheduler import TransformerLRScheduler, noam_lr, noam_peak_lr

__all__ = [
    "FusedAdamW",
    "Noam",
    "InOpScheduleLR",
    "TransformerLRScheduler",
    "param_groups",
    "noam_lr",
    "noam_peak_lr",
    "build_info",
    "cpu_capability",
]

__version__ = "0.1.0"

# Importing the package loads the compiled extension, which registers
# torch.ops.noam_ext.*. Where it cannot be loaded (e.g. a source checkout that was
# never built), the pure-Python parts (the schedule, its demo, param_groups) still
# work, and the names that need it raise the extension's import error when used.
try:
    from . import _extension  # noqa: F401
except ImportError:
    pass

_COMPILED = {"FusedAdamW": ".optimizer", "Noam": ".optimizer", "build_info": "._extension",
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

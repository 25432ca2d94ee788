"""noam_ext: fused, exact AdamW with the Noam learning-rate schedule for PyTorch."""

from ._extension import build_info, cpu_capability
from .optimizer import FusedAdamW, Noam
from .param_groups import param_groups
from .scheduler import TransformerLRScheduler, noam_lr, noam_peak_lr

__all__ = [
    "FusedAdamW",
    "Noam",
    "TransformerLRScheduler",
    "param_groups",
    "noam_lr",
    "noam_peak_lr",
    "build_info",
    "cpu_capability",
]

__version__ = "0.1.0"

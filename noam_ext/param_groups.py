"""Parameter groups with no weight decay on biases and normalisation parameters."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["param_groups", "NORM_LAYER_TYPES"]

# Normalisation layers whose parameters (scales and shifts) must not decay.
# Subclasses (e.g. BatchNorm1d/2d/3d via _NormBase, custom LayerNorm subclasses) are included.
NORM_LAYER_TYPES: tuple[type, ...] = tuple(
    t for t in (
        nn.LayerNorm,
        getattr(nn, "RMSNorm", None),          # torch >= 2.4
        nn.GroupNorm,
        nn.LocalResponseNorm,
        nn.modules.batchnorm._NormBase,         # BatchNorm*, SyncBatchNorm, InstanceNorm*
    ) if t is not None
)


def _is_norm_layer(module: nn.Module, extra_norm_types: tuple[type, ...]) -> bool:
    return isinstance(module, NORM_LAYER_TYPES + extra_norm_types)


def param_groups(model: nn.Module, weight_decay: float = 0.01, *, no_decay_1d: bool = True,
                 extra_norm_types: tuple[type, ...] = (), **group_options) -> list[dict]:
    """Two param groups for AdamW: [decay, no decay].

    No decay, decided by module type and shape (not by name):
      - every parameter of a normalisation layer (LayerNorm, RMSNorm, GroupNorm,
        BatchNorm/InstanceNorm and their subclasses, plus extra_norm_types);
      - every parameter registered under the name "bias" on any module;
      - with no_decay_1d (default), every other parameter with fewer than 2 dimensions
        (scales, gains, 1-D biases of custom modules).
    Everything else (weight matrices, embeddings, convolution kernels) decays.
    Shared parameters appear once; parameters with requires_grad=False are left out.
    Extra keyword arguments (e.g. lr) are copied into both groups.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if float(weight_decay) < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    no_decay_ids: set[int] = set()
    for module in model.modules():
        norm = _is_norm_layer(module, tuple(extra_norm_types))
        for name, p in module.named_parameters(recurse=False):
            if norm or name == "bias" or (no_decay_1d and p.dim() < 2):
                no_decay_ids.add(id(p))
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (no_decay if id(p) in no_decay_ids else decay).append(p)
    return [
        {"params": decay, "weight_decay": float(weight_decay), **group_options},
        {"params": no_decay, "weight_decay": 0.0, **group_options},
    ]

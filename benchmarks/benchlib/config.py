"""What every section of bench_step.py shares: the optimizers compared (ours and torch's
three AdamW implementations), their hyperparameters, and the gradient-clipping settings
and byte counts."""

from __future__ import annotations

from pathlib import Path

import torch

import noam_ext

BYTES_PER_PARAM = 28  # float32, no amsgrad: 4 reads + 3 writes of 4 bytes
D_MODEL, WARMUP = 512, 4000
OURS = "noam_ext"
TORCH_PEERS = (("torch for-loop", dict(foreach=False)), ("torch foreach", dict(foreach=True)),
               ("torch fused", dict(fused=True)))
FUSED = "torch fused"
NO_STEP = "fwd+bwd only"
ZERO_GRADS = ("optimizer.zero_grad()", "model.zero_grad()")
# Small enough that clipping is active in every row (the iteration models' gradient norms
# are 0.01-0.5): an inactive clip would let ours skip the multiply that torch still makes.
CLIP_MAX_NORM = 0.01
CLIP_LABEL = "with clip_grad_norm_"
CLIP_ZERO_GRAD = "optimizer.zero_grad()"   # the one zeroing variant timed with clipping
CLIP_BYTES_OURS = 32    # read the gradient for the norm (4) + the step's 28
CLIP_BYTES_TORCH = 40   # the norm (4) + scale the gradient in place (read + write, 8) + the step's 28
CLIP_MIN_PARAMS = 900_000  # clip + step layouts in a full run: the ~1e6 ones up (the transformer "1.0M"
                           # stack has 991,360); --quick: every flat and transformer one


def clip_unavailable() -> str | None:
    """None when the installed noam_ext has FusedAdamW.clip_grad_norm_, else why the
    clipping rows are skipped."""
    try:
        noam_ext.FusedAdamW.clip_grad_norm_
    except AttributeError:
        return (f"the installed noam_ext ({Path(noam_ext.__file__).parent}) has no FusedAdamW.clip_grad_norm_ "
                f"(AttributeError), so the '{CLIP_LABEL}' iteration rows and the 'clip + step' table are skipped")
    return None


def clip_bytes(peer: str) -> int:
    return CLIP_BYTES_OURS if peer == OURS else CLIP_BYTES_TORCH


def torch_clip(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)


def adamw_kwargs() -> dict:
    return dict(lr=1.0, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.01)


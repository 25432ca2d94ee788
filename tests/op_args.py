"""Arguments for direct calls of torch.ops.noam_ext.fused_adamw_ (and its CUDA
emulation) in tests: lists of tensors as the op takes them."""

from __future__ import annotations

import torch

from noam_ext import Noam
from noam_ext._hyper import BETA1, BETA2, EPS, LR, MAXIMIZE, NUM_HYPER_COLUMNS, SCHEDULE_BLOCK, WEIGHT_DECAY

LIST_KEYS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps")


def hyper_table(groups: int = 3) -> torch.Tensor:
    """Three differently configured groups: two with the in-op Noam schedule, one with maximize."""
    hyper = torch.zeros(groups, NUM_HYPER_COLUMNS, dtype=torch.float64)
    hyper[:, LR] = torch.tensor([1.0, 0.5, 2e-3])[:groups]
    hyper[:, BETA1] = torch.tensor([0.9, 0.8, 0.95])[:groups]
    hyper[:, BETA2] = torch.tensor([0.98, 0.999, 0.99])[:groups]
    hyper[:, EPS] = torch.tensor([1e-9, 1e-8, 1e-6])[:groups]
    hyper[:, WEIGHT_DECAY] = torch.tensor([0.01, 0.0, 0.1])[:groups]
    noam = Noam(64, 10).table_block()
    hyper[:min(2, groups), SCHEDULE_BLOCK:SCHEDULE_BLOCK + len(noam)] = torch.tensor(noam, dtype=torch.float64)
    hyper[:, MAXIMIZE] = torch.tensor([0.0, 1.0, 0.0])[:groups]
    return hyper


def _tensor(numel: int, generator, dtype, misaligned: bool, positive: bool = False) -> torch.Tensor:
    """A tensor of `numel` elements; a misaligned one is a view one element into a
    larger buffer, so its data pointer is off the 16-byte grid (as a slice of a
    bigger parameter can be)."""
    values = torch.randn(numel + 1, generator=generator, dtype=torch.float64)
    if positive:
        values = values.abs()
    values = values.to(dtype)
    return values[1:] if misaligned else values[:numel].clone()


def make_args(numels, dtype=torch.float32, amsgrad=False, seed=0, misaligned_every=0, groups=3):
    """Lists for one call: tensor i is in group i % groups, has taken i % 4 steps,
    and is misaligned when misaligned_every divides i + 1."""
    generator = torch.Generator().manual_seed(seed)
    n = len(numels)
    args = {key: [] for key in LIST_KEYS}
    for i, numel in enumerate(numels):
        odd = misaligned_every > 0 and (i + 1) % misaligned_every == 0
        args["params"].append(_tensor(numel, generator, dtype, odd))
        args["grads"].append(_tensor(numel, generator, dtype, odd))
        args["exp_avgs"].append(_tensor(numel, generator, dtype, odd))
        args["exp_avg_sqs"].append(_tensor(numel, generator, dtype, odd, positive=True))
        if amsgrad:
            args["max_exp_avg_sqs"].append(_tensor(numel, generator, dtype, odd, positive=True))
        args["state_steps"].append(torch.tensor(float(i % 4)))
    args["schedule_step"] = torch.tensor([5], dtype=torch.int64)
    args["hyper"] = hyper_table(groups)
    args["groups"] = [i % groups for i in range(n)]
    return args


def positional(a):
    return (a["params"], a["grads"], a["exp_avgs"], a["exp_avg_sqs"], a["max_exp_avg_sqs"], a["state_steps"],
            a["schedule_step"], a["hyper"], a["groups"])


def clone(a):
    out = {}
    for key, value in a.items():
        if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            out[key] = [t.clone() for t in value]
        elif isinstance(value, torch.Tensor):
            out[key] = value.clone()
        else:
            out[key] = value
    return out


def tensors_of(a):
    """(name, tensor) for every tensor of a call, for comparisons."""
    for key in LIST_KEYS:
        for i, t in enumerate(a[key]):
            yield f"{key}[{i}]", t
    yield "schedule_step", a["schedule_step"]

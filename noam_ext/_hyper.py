"""The per-group hyperparameter table the fused op reads, and the checks that
torch.optim.AdamW makes on hyperparameters (with its messages)."""

from __future__ import annotations

import math
from typing import Any

import torch

# Columns of the table; keep in sync with csrc/noam_ext/adamw_math.h (HyperColumn).
LR, BETA1, BETA2, EPS, WEIGHT_DECAY, D_MODEL, WARMUP, MAXIMIZE = range(8)
NUM_HYPER_COLUMNS = 8

# Complex parameters are updated as their real views, as torch.optim.AdamW does.
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64, torch.complex128)


def as_float(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Invalid {name}: {value!r} is not a number") from None


def check_hyperparameters(lr, betas, eps, weight_decay, where: str = "") -> None:
    """torch.optim.AdamW's checks and messages, plus NaN and type checks."""
    lr = as_float("lr", lr)
    eps = as_float("eps", eps)
    weight_decay = as_float("weight_decay", weight_decay)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas{where}: {betas!r} must be a pair (beta1, beta2)")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate{where}: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value{where}: {eps}")
    for index, beta in enumerate(betas):
        beta = as_float(f"beta{index + 1}", beta)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}{where}: {beta}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value{where}: {weight_decay}")


def check_tensor_hyperparameters(lr, betas, foreach, capturable) -> None:
    """The checks torch.optim.AdamW's constructor makes on Tensor lr and betas, with
    its messages (foreach=True cannot take them without capturable=True)."""
    if isinstance(lr, torch.Tensor):
        if foreach and not capturable:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} must be a pair (beta1, beta2)")
    if isinstance(betas[0], torch.Tensor) != isinstance(betas[1], torch.Tensor):
        raise ValueError("betas must be either both floats or both Tensors")
    for index, beta in enumerate(betas):
        if isinstance(beta, torch.Tensor):
            if foreach and not capturable:
                raise ValueError(f"betas[{index}] as a Tensor is not supported for capturable=False and "
                                 "foreach=True")
            if beta.numel() != 1:
                raise ValueError(f"Tensor betas[{index}] must be 1-element")


def _plain(value: Any) -> Any:
    """A tensor hyperparameter as a Python float (a sync for a GPU tensor: prefer floats)."""
    return value.item() if isinstance(value, torch.Tensor) else value


class HyperTable:
    """The float64 [groups, NUM_HYPER_COLUMNS] CPU table of the op, rebuilt (and
    checked) only when some group's hyperparameters changed."""

    def __init__(self):
        self._key: tuple | None = None
        self._table: torch.Tensor | None = None

    def get(self, param_groups: list[dict], schedule) -> torch.Tensor:
        rows = []
        for group in param_groups:
            base_lr = group["initial_lr"] if schedule is not None else group["lr"]
            betas = group["betas"] if isinstance(group["betas"], (tuple, list)) else (group["betas"],)
            # _plain(): a tensor lr changed in place (as torch's schedulers do) must change the key.
            rows.append(tuple(_plain(v) for v in (base_lr, *betas, group["eps"], group["weight_decay"]))
                        + (bool(group["maximize"]),))
        key = tuple(rows)
        if key != self._key:
            self._table = self._build(rows, schedule)
            self._key = key
        return self._table

    @staticmethod
    def _build(rows: list[tuple], schedule) -> torch.Tensor:
        table = []
        for index, row in enumerate(rows):
            *numbers, maximize = row
            where = f" in param group {index}"
            check_hyperparameters(numbers[0], tuple(numbers[1:-2]), numbers[-2], numbers[-1], where)
            values = [float(v) for v in numbers]   # the check above made sure they convert
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"Invalid hyperparameters{where}: {values} must be finite")
            table.append(table_row(values, maximize, schedule))
        return torch.tensor(table, dtype=torch.float64).reshape(len(rows), NUM_HYPER_COLUMNS)


def table_row(values: list[float], maximize: bool, schedule) -> list[float]:
    """One row of the table, in column order: values are (base lr, beta1, beta2, eps,
    weight decay); the Noam settings are 0 without a schedule (the op then uses lr as is)."""
    lr, beta1, beta2, eps, weight_decay = values
    row = [0.0] * NUM_HYPER_COLUMNS
    row[LR], row[BETA1], row[BETA2], row[EPS], row[WEIGHT_DECAY] = lr, beta1, beta2, eps, weight_decay
    if schedule is not None:
        row[D_MODEL], row[WARMUP] = float(schedule.d_model), float(schedule.warmup_steps)
    row[MAXIMIZE] = 1.0 if maximize else 0.0
    return row

"""The per-group hyperparameter table the fused op reads, and the checks that
torch.optim.AdamW makes on hyperparameters (with its messages)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ._layout import table_layout

# Columns of the table, as the op defines them (csrc/noam_ext/adamw_math.h, HyperColumn,
# exported by noam_ext._C.table_layout()): AdamW's own settings, then the schedule block,
# which noam_ext/schedules.py fills.
_COLUMNS = table_layout()["hyper_columns"]
LR, BETA1, BETA2, EPS, WEIGHT_DECAY, MAXIMIZE, SCHEDULE_BLOCK = (
    _COLUMNS[name] for name in ("lr", "beta1", "beta2", "eps", "weight_decay", "maximize", "schedule_block"))
NUM_HYPER_COLUMNS = table_layout()["num_hyper_columns"]


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


def _on_gpu(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type != "cpu"


# The table's columns that param groups give values for, in their order.
_GROUP_COLUMNS = (LR, BETA1, BETA2, EPS, WEIGHT_DECAY)
# What the host table holds for a value read on the device only (a valid setting,
# so that the host-side checks pass; no host call reads it), and what the cache key
# holds for it (the value itself is copied on the device at every step).
_READ_ON_DEVICE = 0.0
_ON_DEVICE_KEY = ("read on the device",)


class HyperTable:
    """The float64 [groups, NUM_HYPER_COLUMNS] CPU table of the op, rebuilt (and
    checked) only when some group's hyperparameters changed.

    With read_gpu_tensors=False, hyperparameters that are tensors on a GPU (a Tensor
    lr, as torch's capturable AdamW takes it) are not read on the host, which would
    be a sync (and is illegal during CUDA graph capture): the host table holds a
    placeholder for them, and `device_entries` lists them as (group, column, tensor)
    for DeviceHyperTables to copy on the device."""

    def __init__(self):
        self._key: tuple | None = None
        self._table: torch.Tensor | None = None
        self.device_entries: list[tuple[int, int, torch.Tensor]] = []
        # The objects the table was last built from, per group (base lr, beta1, beta2, eps,
        # weight decay, maximize), when none was a tensor: the same objects again are the
        # same values (Python numbers are immutable), found without building the key.
        self._plain_sources: list[tuple] | None = None

    def get(self, param_groups: list[dict], schedule, read_gpu_tensors: bool = True) -> torch.Tensor:
        if self._unchanged(param_groups, schedule):
            self.device_entries = []
            return self._table
        rows, device_entries = [], []
        for index, group in enumerate(param_groups):
            base_lr = group["initial_lr"] if schedule is not None else group["lr"]
            betas = group["betas"] if isinstance(group["betas"], (tuple, list)) else (group["betas"],)
            row = []
            for column, value in zip(_GROUP_COLUMNS, (base_lr, *betas, group["eps"], group["weight_decay"])):
                if not read_gpu_tensors and _on_gpu(value):
                    device_entries.append((index, column, value))
                    row.append(_ON_DEVICE_KEY)
                else:
                    # _plain(): a tensor lr changed in place (as torch's schedulers do) must change the key.
                    row.append(_plain(value))
            rows.append(tuple(row) + (bool(group["maximize"]),))
        key = (tuple(rows), read_gpu_tensors)
        if key != self._key:
            self._table = self._build(rows, schedule)
            self._key = key
        self.device_entries = device_entries
        self._plain_sources = self._sources(param_groups, schedule)
        if any(isinstance(value, torch.Tensor) for row in self._plain_sources for value in row):
            self._plain_sources = None
        return self._table

    @staticmethod
    def _sources(param_groups: list[dict], schedule) -> list[tuple]:
        lr_key = "initial_lr" if schedule is not None else "lr"
        return [(group[lr_key], *group["betas"], group["eps"], group["weight_decay"], group["maximize"])
                for group in param_groups]

    def _unchanged(self, param_groups: list[dict], schedule) -> bool:
        """Whether every group holds the very objects the table was built from (a check of
        identities: a steady step with float hyperparameters pays no more)."""
        before = self._plain_sources
        if before is None or len(before) != len(param_groups):
            return False
        now = self._sources(param_groups, schedule)
        return all(len(a) == len(b) and all(x is y for x, y in zip(a, b)) for a, b in zip(now, before))

    @staticmethod
    def _build(rows: list[tuple], schedule) -> torch.Tensor:
        table = []
        for index, row in enumerate(rows):
            *numbers, maximize = row
            numbers = [_READ_ON_DEVICE if isinstance(v, tuple) else v for v in numbers]
            where = f" in param group {index}"
            check_hyperparameters(numbers[0], tuple(numbers[1:-2]), numbers[-2], numbers[-1], where)
            values = [float(v) for v in numbers]   # the check above made sure they convert
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"Invalid hyperparameters{where}: {values} must be finite")
            table.append(table_row(values, maximize, schedule))
        return torch.tensor(table, dtype=torch.float64).reshape(len(rows), NUM_HYPER_COLUMNS)


class _EagerTable:
    """A GPU's table for eager steps, the host table copied into it last, and how many
    times a host table was copied in (counted on the host and, stream-ordered, on the
    device, where graph replays compare it with its value at their capture)."""

    def __init__(self, shape: torch.Size, device: torch.device):
        self.table = torch.empty(shape, dtype=torch.float64, device=device)
        self.host: torch.Tensor | None = None
        self.uploads = torch.zeros(1, dtype=torch.int64, device=device)
        self.uploads_on_host = 0

    def upload(self, host: torch.Tensor) -> None:
        # From a fresh pinned block (no sync): the host allocator keeps it until the copy has run.
        self.table.copy_(host.pin_memory() if self.table.is_cuda else host, non_blocking=True)
        self.uploads.add_(1)
        self.uploads_on_host += 1
        self.host = host


class DeviceHyperTables:
    """Per GPU, the copy of the hyperparameter table that the kernels read there.

    The kernels read it when they run, so a CUDA graph replay sees whatever
    stream-ordered copies wrote into it before, as torch's capturable AdamW reads a
    Tensor lr. Eager steps use one table per GPU:
    - the host table is copied in (from pinned memory: no sync) when it is not the
      one copied last (HyperTable returns a new table only when values changed), so
      a float lr changed between eager steps, by hand or by a torch LR scheduler,
      reaches the device;
    - hyperparameters that are tensors on a GPU (HyperTable.device_entries) are
      copied device to device at every step, without being read on the host.
    A step captured in a CUDA graph gets a table of its own, which the graph fills at
    every replay (fill_captured_table): with the float values of the latest eager
    step or, when the host values changed after it and before the capture (a float lr
    a scheduler set just before capturing), with those values until an eager step
    copies newer ones in; then from the Tensor hyperparameters. So torch's LR
    schedulers, which update a Tensor lr in place, drive replayed steps as they drive
    eager ones, a float lr changed after capture reaches the replays through an eager
    step, and replays never write what eager steps read. A capture allocates nothing
    on the host (the values at capture reach the device in kernel parameters), and the
    graph itself keeps the tables it reads for as long as it lives."""

    def __init__(self):
        self._eager: dict[torch.device, _EagerTable] = {}

    def get(self, device: torch.device, host: torch.Tensor,
            device_entries: list[tuple[int, int, torch.Tensor]]) -> torch.Tensor:
        eager = self._eager.get(device)
        if eager is None or eager.table.shape != host.shape:
            # A graph captured with the old table keeps it (hold_for_captured_graph).
            eager = self._eager[device] = _EagerTable(host.shape, device)
        if self._capturing(device):
            table = torch.empty_like(eager.table)
            changed = eager.host is not host
            fill_captured_table(table, eager, host if changed else None, eager.uploads_on_host)
            if table.is_cuda:
                torch.ops.noam_ext.hold_for_captured_graph([table, eager.table, eager.uploads])
        else:
            if eager.host is not host:
                eager.upload(host)
            table = eager.table
        for g, c, value in device_entries:
            # One small copy each (a conversion kernel; from another GPU, a peer copy):
            # nothing is read on the host or allocated there, under capture too.
            table[g, c].copy_(value.detach().reshape(()), non_blocking=True)
        return table

    @staticmethod
    def _capturing(device: torch.device) -> bool:
        if device.type != "cuda":
            return False
        with torch.cuda.device(device):
            return torch.cuda.is_current_stream_capturing()


def fill_captured_table(table: torch.Tensor, eager: _EagerTable, host_at_capture: torch.Tensor | None,
                        uploads_at_capture: int) -> None:
    """What a captured step does to its table at every replay (stream-ordered, so the
    graph repeats it): copy the eager table, whose values are those of the latest eager
    step; or, when the host values at capture are newer than that (host_at_capture),
    write those (carried in kernel parameters: no pinned memory) and keep them until
    an eager upload follows the capture (the device counter passes uploads_at_capture)."""
    if host_at_capture is None:
        table.copy_(eager.table, non_blocking=True)
        return
    if table.is_cuda:
        torch.ops.noam_ext.upload_by_launch_(table, host_at_capture)
    else:
        table.copy_(host_at_capture)
    newer = eager.uploads > uploads_at_capture
    torch.where(newer, eager.table, table, out=table)


def table_row(values: list[float], maximize: bool, schedule) -> list[float]:
    """One row of the table, in column order: values are (base lr, beta1, beta2, eps,
    weight decay); the schedule block is all 0 without a schedule (the op then uses
    lr as is)."""
    lr, beta1, beta2, eps, weight_decay = values
    row = [0.0] * NUM_HYPER_COLUMNS
    row[LR], row[BETA1], row[BETA2], row[EPS], row[WEIGHT_DECAY] = lr, beta1, beta2, eps, weight_decay
    row[MAXIMIZE] = 1.0 if maximize else 0.0
    if schedule is not None:
        for offset, value in enumerate(schedule.table_block()):
            row[SCHEDULE_BLOCK + offset] = value
    return row

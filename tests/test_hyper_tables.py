"""The hyperparameter tables the kernels read (noam_ext/_hyper.py), checked on the
host: which values are read on the host, which are copied on the device at every
step, and when the device copy is refreshed. The GPU side (graph replays following
a torch LR scheduler) is in test_cuda.py."""

from __future__ import annotations

import pytest
import torch

from noam_ext._hyper import BETA1, LR, NUM_HYPER_COLUMNS, DeviceHyperTables, HyperTable
from op_args import make_args, positional


def groups(lr0, lr1=0.5):
    common = dict(betas=(0.9, 0.98), eps=1e-9, weight_decay=0.01, maximize=False)
    return [dict(lr=lr0, **common), dict(lr=lr1, **common)]


def test_a_gpu_tensor_lr_is_not_read_on_the_host():
    # A meta tensor stands for a GPU one: reading it on the host (.item()) would raise,
    # as it would sync (or fail during graph capture) on a GPU.
    lr = torch.tensor(0.25, device="meta")
    table = HyperTable()
    host = table.get(groups(lr), schedule=None, read_gpu_tensors=False)
    assert host.shape == (2, NUM_HYPER_COLUMNS)
    assert host[0, LR] == 0.0 and host[1, LR] == 0.5   # a placeholder, and a float read as is
    assert [(g, c) for g, c, _ in table.device_entries] == [(0, LR)]
    assert table.device_entries[0][2] is lr


def test_the_host_table_is_rebuilt_only_when_a_value_changes():
    table = HyperTable()
    first = table.get(groups(0.1), schedule=None)
    assert table.get(groups(0.1), schedule=None) is first
    second = table.get(groups(0.2), schedule=None)
    assert second is not first and second[0, LR] == 0.2
    # A CPU tensor lr changed in place (as torch's schedulers change it) is a new value.
    lr = torch.tensor(0.3, dtype=torch.float64)
    third = table.get(groups(lr), schedule=None)
    lr.fill_(0.4)
    fourth = table.get(groups(lr), schedule=None)
    assert third[0, LR] == 0.3 and fourth[0, LR] == 0.4


def test_device_table_is_copied_when_the_host_table_changes_and_tensor_entries_every_step():
    device = torch.device("cpu")   # the logic is the same on a GPU (there: pinned, stream-ordered copies)
    hyper, tables = HyperTable(), DeviceHyperTables()
    host = hyper.get(groups(0.1), schedule=None)
    table = tables.get(device, host, [])
    assert torch.equal(table, host) and table is not host
    # The same host table is not copied again: a value written on the device stays.
    table[1, BETA1] = 0.5
    assert tables.get(device, host, []) is table and table[1, BETA1] == 0.5
    # A changed host table is.
    host = hyper.get(groups(0.2), schedule=None)
    assert tables.get(device, host, []) is table and torch.equal(table, host)
    # Tensor entries are copied at every call, whatever the host table.
    lr = torch.tensor(0.7)
    entries = [(0, LR, lr), (1, BETA1, torch.tensor(0.8))]
    tables.get(device, host, entries)
    assert table[0, LR] == torch.tensor(0.7).double() and table[1, BETA1] == torch.tensor(0.8).double()
    lr.fill_(0.05)
    tables.get(device, host, entries)
    assert table[0, LR] == torch.tensor(0.05).double()


def test_a_replaced_device_table_is_kept():
    # A graph captured before a param group was added still points at the old table.
    tables, hyper = DeviceHyperTables(), HyperTable()
    first = tables.get(torch.device("cpu"), hyper.get(groups(0.1), schedule=None), [])
    more = groups(0.1) + groups(0.2)[:1]
    second = tables.get(torch.device("cpu"), hyper.get(more, schedule=None), [])
    assert second.shape == (3, NUM_HYPER_COLUMNS) and any(t is first for t in tables._kept)


def test_python_and_the_op_agree_on_the_number_of_columns():
    # kNumHyperColumns (adamw_math.h) against NUM_HYPER_COLUMNS: the op names the width
    # it expects. (Where each column sits is checked through what the op does with it:
    # test_schedules_in_op.py reads the schedule block's lr bit for bit, test_op.py maximize.)
    args = make_args([3, 5])
    args["hyper"] = args["hyper"][:, :-1].contiguous()
    with pytest.raises(RuntimeError, match=rf"\[groups, {NUM_HYPER_COLUMNS}\]"):
        torch.ops.noam_ext.fused_adamw_(*positional(args))

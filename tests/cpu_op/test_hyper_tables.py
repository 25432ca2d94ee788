"""The hyperparameter tables the kernels read (noam_ext/_hyper.py), checked on the
host: which values are read on the host, which are copied on the device at every
step, when the device copy is refreshed, and what a captured step's table holds at
each replay (the capture path runs on the CPU here, and a replay is its fill run
again). The GPU side (real captures and replays) is in test_cuda.py."""

from __future__ import annotations

import pytest
import torch

from noam_ext._hyper import BETA1, LR, NUM_HYPER_COLUMNS, DeviceHyperTables, HyperTable, fill_captured_table
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


def capturing(monkeypatch, on: bool):
    """Makes DeviceHyperTables take its CUDA graph capture path on the CPU, where what
    it records runs at once: fill_captured_table, called again, stands for a replay."""
    monkeypatch.setattr(DeviceHyperTables, "_capturing", staticmethod(lambda device: on))


def test_replays_use_the_values_at_capture_until_an_eager_step_copies_newer_ones(monkeypatch):
    # The lr changed after the latest eager step and before the capture (a scheduler's
    # float lr): replays must use it, and then follow the eager steps after the capture
    # (before the fix, replays used the values at capture for good).
    device, hyper, tables = torch.device("cpu"), HyperTable(), DeviceHyperTables()
    tables.get(device, hyper.get(groups(0.1), schedule=None), [])   # an eager step
    eager = tables._eager[device]
    at_capture = hyper.get(groups(0.2), schedule=None)
    capturing(monkeypatch, True)
    graph_table = tables.get(device, at_capture, [])
    capturing(monkeypatch, False)
    assert graph_table is not eager.table and eager.table[0, LR] == 0.1   # the capture wrote no eager value
    uploads_at_capture = 1

    def replay():
        fill_captured_table(graph_table, eager, at_capture, uploads_at_capture)
        return float(graph_table[0, LR])

    assert float(graph_table[0, LR]) == 0.2 and replay() == 0.2
    assert tables.get(device, at_capture, []) is eager.table   # an eager step copies the values in
    assert replay() == 0.2
    tables.get(device, hyper.get(groups(0.3), schedule=None), [])   # an eager step at a new lr
    assert replay() == 0.3 and float(graph_table[1, LR]) == 0.5
    tables.get(device, hyper.get(groups(0.3), schedule=None), [])   # unchanged: nothing copied
    assert replay() == 0.3 and eager.uploads_on_host == int(eager.uploads) == 3


def test_a_capture_with_unchanged_values_reads_the_eager_table(monkeypatch):
    device, hyper, tables = torch.device("cpu"), HyperTable(), DeviceHyperTables()
    host = hyper.get(groups(0.1), schedule=None)
    tables.get(device, host, [])
    capturing(monkeypatch, True)
    lr = torch.tensor(0.7)
    graph_table = tables.get(device, host, [(0, LR, lr)])   # a Tensor lr: copied after the fill
    capturing(monkeypatch, False)
    eager = tables._eager[device]
    assert graph_table is not eager.table and graph_table[0, LR] == lr.double() and eager.table[0, LR] == 0.1
    tables.get(device, hyper.get(groups(0.4), schedule=None), [])
    fill_captured_table(graph_table, eager, None, 1)   # a replay: the eager table's values
    assert graph_table[0, LR] == 0.4


def test_a_replaced_device_table_is_a_new_one():
    # Adding a param group changes the table's shape: eager steps get a new table (a
    # graph captured before keeps the old one alive itself, on the GPU).
    tables, hyper = DeviceHyperTables(), HyperTable()
    first = tables.get(torch.device("cpu"), hyper.get(groups(0.1), schedule=None), [])
    more = groups(0.1) + groups(0.2)[:1]
    second = tables.get(torch.device("cpu"), hyper.get(more, schedule=None), [])
    assert second.shape == (3, NUM_HYPER_COLUMNS) and first.shape == (2, NUM_HYPER_COLUMNS)
    assert torch.equal(second, hyper.get(more, schedule=None))


def test_python_and_the_op_agree_on_the_number_of_columns():
    # kNumHyperColumns (adamw_math.h) against NUM_HYPER_COLUMNS: the op names the width
    # it expects. (Where each column sits is checked through what the op does with it:
    # test_schedules_in_op.py reads the schedule block's lr bit for bit, test_op.py maximize.)
    args = make_args([3, 5])
    args["hyper"] = args["hyper"][:, :-1].contiguous()
    with pytest.raises(RuntimeError, match=rf"\[groups, {NUM_HYPER_COLUMNS}\]"):
        torch.ops.noam_ext.fused_adamw_(*positional(args))


def test_the_table_layout_is_the_ops_own():
    # The layout is defined in C++ and read by Python (noam_ext/_layout.py): every schedule kind
    # and decay shape Python can build is one the op knows, every column has a place of its
    # own, and the names users give decay shapes are the op's.
    import noam_ext
    from noam_ext import _C
    from noam_ext.schedules import DECAY_SHAPES, Schedule

    layout = _C.table_layout()
    hyper = layout["hyper_columns"]
    assert sorted(hyper.values()) == list(range(len(hyper)))   # schedule_block last, after AdamW's own
    assert layout["num_hyper_columns"] == hyper["schedule_block"] + layout["num_schedule_columns"]
    assert sorted(layout["schedule_columns"].values()) == list(range(layout["num_schedule_columns"]))
    assert list(DECAY_SHAPES) == layout["decay_shapes"]
    kinds = {cls._KIND for cls in Schedule.__subclasses__()} | {Schedule._KIND}
    assert kinds == set(layout["schedule_kinds"])
    assert NUM_HYPER_COLUMNS == layout["num_hyper_columns"] and LR == hyper["lr"] and BETA1 == hyper["beta1"]
    block = noam_ext.WarmupStableDecay(2, 3, 4, decay="exponential", min_lr_ratio=0.5).table_block()
    columns = layout["schedule_columns"]
    assert block[columns["kind"]] == layout["schedule_kinds"]["warmup_stable_decay"]
    assert block[columns["decay_shape"]] == layout["decay_shapes"].index("exponential")
    assert block[columns["min_lr_ratio"]] == 0.5

"""One step() crosses into C++ once in the steady state, and at most twice when something must be
prepared first: the collector reports every problem of every parameter at once (no state yet, a step
to move, a missing master, a device without a schedule counter), FusedAdamW prepares them all, and
the next call makes the step."""

from __future__ import annotations

import pytest
import torch

from noam_ext import FusedAdamW, Noam
from noam_ext import optimizer as optimizer_module


class CountingModule:
    """noam_ext._C with its fused_step calls counted."""

    def __init__(self, real):
        self._real = real
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self._real, name)

    def fused_step(self, *args, **kwargs):
        self.calls += 1
        return self._real.fused_step(*args, **kwargs)


@pytest.fixture
def counted(monkeypatch):
    counting = CountingModule(optimizer_module._C)
    monkeypatch.setattr(optimizer_module, "_C", counting)
    return counting


def backward(model):
    model(torch.randn(3, 8, dtype=next(model.parameters()).dtype)).square().mean().backward()


def test_a_first_step_collects_twice_and_a_steady_step_once(counted):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    opt = FusedAdamW(model.parameters(), lr=1e-3, schedule=Noam(16, 4))
    backward(model)
    opt.step()   # no state and no schedule counter yet: both reported by the first call
    assert counted.calls == 2
    for _ in range(3):
        backward(model)
        opt.step()
    assert counted.calls == 5


def test_a_checkpoint_with_steps_to_move_and_no_masters_collects_twice(counted):
    # A torch.optim.AdamW checkpoint of bfloat16 parameters, with its steps as Python floats (older
    # torch) and no masters, loaded into a master-weight optimizer: both problems of every
    # parameter are reported at once.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)).to(torch.bfloat16)
    reference = torch.optim.AdamW(model.parameters(), lr=1e-3)
    backward(model)
    reference.step()
    checkpoint = reference.state_dict()
    for state in checkpoint["state"].values():
        state["step"] = float(state["step"])
    opt = FusedAdamW(model.parameters(), lr=1e-3, master_weights="float32")
    opt.load_state_dict(checkpoint)
    for p in model.parameters():
        opt.state[p]["step"] = float(opt.state[p]["step"])   # torch's load keeps a number a number
        opt.state[p].pop("master_param", None)
    backward(model)
    opt.step()
    assert counted.calls == 2
    assert all(opt.state[p]["step"].dtype == torch.float32 and "master_param" in opt.state[p]
               for p in model.parameters())
    backward(model)
    opt.step()
    assert counted.calls == 3

"""The schedule family inside the op: the k-th step() of FusedAdamW(schedule=S) uses
exactly the lr that torch.optim.AdamW (or FusedAdamW without a schedule) uses under
S's LambdaLR twin, bit for bit on the CPU, over every step of short schedules
(warmup, the switch points, the tail, past the end) and at sampled steps of
1e6-step ones; the same through the host emulation of the CUDA grid; and a resumed
run continues bitwise. The lr is read exactly with tests/lr_probe.py."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from noam_ext import FusedAdamW, Noam, ScheduleLR, WarmupConstant, WarmupCosine, WarmupLinear, WarmupStableDecay

import host_run
from lr_probe import PROBE_HYPER, op_lrs, reset_for_probe
from schedule_cases import LONG, SHORT, sampled_steps, short_steps

BASES = (1.0, 3e-4)   # two groups per schedule: the op multiplies the base lr by the factor


def rows_of(table):
    return [(base, schedule) for schedule in table.values() for base in BASES]


def expected(rows, steps):
    return [[base * schedule.factor(k) for base, schedule in rows] for k in steps]


def short_union():
    return sorted({k for schedule in SHORT.values() for k in short_steps(schedule)})


def long_union():
    return sorted({k for schedule in LONG.values() for k in sampled_steps(schedule, count=60)})


@pytest.mark.parametrize("length", ["short", "1e6"])
def test_cpu_op_lr_is_the_twins_bit_for_bit(length):
    table, steps = (SHORT, short_union()) if length == "short" else (LONG, long_union())
    rows = rows_of(table)
    assert op_lrs(rows, steps) == expected(rows, steps)


@pytest.mark.parametrize("grid", [(1, 1), (3, 64)], ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("length", ["short", "1e6"])
def test_emulated_cuda_grid_lr_is_the_twins_bit_for_bit(length, grid):
    # The emulation runs the CUDA prepare pass's code (coefficients_for, one
    # emulated thread per tensor) on the host, with the host's libm.
    table, steps = (SHORT, short_union()) if length == "short" else (LONG, long_union())
    rows = rows_of(table)
    got = op_lrs(rows, steps, op=host_run.ops().fused_adamw_, num_blocks=grid[0],
                 threads_per_block=grid[1])
    assert got == expected(rows, steps)


def test_no_schedule_uses_the_lr_as_is():
    assert op_lrs([(0.1, None), (2.5e-4, None)], [0, 7, 10**9]) == [[0.1, 2.5e-4]] * 3


def probe_params(dtypes=(torch.float64, torch.float32)):
    """One parameter per group, float64 and float32 (two op calls per step)."""
    return [torch.nn.Parameter(torch.zeros(3, dtype=dtype)) for dtype in dtypes]


def probe_groups(params):
    return [{"params": [p], "lr": base} for p, base in zip(params, BASES)]


@pytest.mark.parametrize("name", list(SHORT))
def test_kth_step_uses_the_lr_of_torch_adamw_under_the_twin_lambda_lr(name):
    schedule = SHORT[name]
    in_op_params, host_params, torch_params = probe_params(), probe_params(), probe_params()
    in_op = FusedAdamW(probe_groups(in_op_params), schedule=schedule, **PROBE_HYPER)
    host = FusedAdamW(probe_groups(host_params), **PROBE_HYPER)   # no schedule: the op uses group["lr"]
    host_twin = ScheduleLR(host, schedule)
    reference = torch.optim.AdamW(probe_groups(torch_params), foreach=False, **PROBE_HYPER)
    reference_twin = ScheduleLR(reference, schedule)
    for k in range(1, len(short_steps(schedule)) + 1):
        assert in_op.get_last_lr() == reference_twin.get_last_lr(), k   # the host mirror, before the step
        for params in (in_op_params, host_params, torch_params):
            reset_for_probe(params)
        in_op.step()
        host.step()
        reference.step()
        host_twin.step()
        reference_twin.step()
        lrs = [base * schedule.factor(k - 1) for base in BASES]
        for params in (in_op_params, host_params, torch_params):
            # float64 holds -lr exactly; float32 holds it rounded once, in both optimizers.
            assert [-p[0].item() for p in params] == [lrs[0], float(torch.tensor(lrs[1], dtype=torch.float32))], k
        for a, b in zip(in_op_params, torch_params):
            assert torch.equal(a, b)


# ---- resume ---------------------------------------------------------------------------------------

def model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))


def train(m, opt, steps, x):
    for _ in range(steps):
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()


RESUMED = {
    "cosine": WarmupCosine(4, 20, min_lr_ratio=0.1),
    "wsd": WarmupStableDecay(3, 5, 8, decay="exponential", min_lr_ratio=0.05),
    "linear": WarmupLinear(2, 12),
    "noam": Noam(16, 4),
}


@pytest.mark.parametrize("name", list(RESUMED))
def test_a_resumed_run_continues_bitwise(name):
    schedule = RESUMED[name]
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    straight_model, first_model = model(), model()
    straight = FusedAdamW(straight_model.parameters(), lr=1e-2, schedule=schedule)
    first = FusedAdamW(first_model.parameters(), lr=1e-2, schedule=schedule)
    train(straight_model, straight, 25, x)   # across the warmup, the decay and past the end
    train(first_model, first, 7, x)
    buffer = io.BytesIO()
    torch.save({"model": first_model.state_dict(), "opt": first.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    assert checkpoint["opt"]["noam_schedule_step"] == 7
    resumed_model = model(seed=5)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = FusedAdamW(resumed_model.parameters(), lr=1e-2, schedule=schedule)
    resumed.load_state_dict(checkpoint["opt"])
    assert resumed.get_last_lr() == [1e-2 * schedule.factor(7)]
    train(resumed_model, resumed, 18, x)
    for a, b in zip(straight_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
        for key, value in straight.state[a].items():
            assert torch.equal(resumed.state[b][key], value), key
    assert resumed.state_dict()["noam_schedule_step"] == 25


def test_a_checkpoint_loaded_under_another_schedule_continues_on_that_schedule_from_the_saved_step():
    # E.g. a run extended from 20 to 40 steps: the position comes from the checkpoint,
    # the curve from the optimizer's own schedule (the lr jumps from the old floor
    # to the longer cosine's value at step 12).
    short, longer = WarmupCosine(4, 20, min_lr_ratio=0.1), WarmupCosine(4, 40, min_lr_ratio=0.1)
    params = probe_params((torch.float64,))
    opt = FusedAdamW(probe_groups(params), schedule=short, **PROBE_HYPER)
    for _ in range(12):
        reset_for_probe(params)
        opt.step()
    checkpoint = copy.deepcopy(opt.state_dict())   # a loaded state is used as loaded: keep this one apart
    extended = FusedAdamW(probe_groups(params), schedule=longer, **PROBE_HYPER)
    extended.load_state_dict(copy.deepcopy(checkpoint))
    assert extended.get_last_lr() == [longer.factor(12)] != [short.factor(12)]
    reset_for_probe(params)
    extended.step()
    assert -params[0][0].item() == longer.factor(12)
    # A checkpoint without the position (torch.optim.AdamW's, or one saved without a
    # schedule) resumes at its parameters' step count.
    del checkpoint["noam_schedule_step"]
    constant = FusedAdamW(probe_groups(params), schedule=WarmupConstant(20), **PROBE_HYPER)
    constant.load_state_dict(checkpoint)
    assert constant.get_last_lr() == [12 / 20]


def test_every_schedule_is_accepted_and_anything_else_named():
    p = torch.nn.Parameter(torch.zeros(2))
    for schedule in SHORT.values():
        assert FusedAdamW([p], schedule=schedule).schedule is schedule
    with pytest.raises(ValueError, match="schedule must be a noam_ext schedule"):
        FusedAdamW([p], schedule=lambda k: 1.0)

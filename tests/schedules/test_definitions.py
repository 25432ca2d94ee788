"""The schedule family (noam_ext.schedules) and its LambdaLR twins (noam_ext.schedule_lr),
on the host: against the published definitions each follows, over every step of a
short schedule and at sampled steps of a 1e6-step one.

- Against HF transformers' own lr lambdas where transformers is installed (a test-only
  dependency): bit for bit, over the range where HF defines each schedule the way
  ours does (docs/adamw.md says where they part: past the end of HF's cosine).
- Always, against formulas written here from the definitions (Megatron-LM's
  OptimizerParamScheduler.get_lr, which writes the floor as min_lr + coeff * (max_lr
  - min_lr) and the inverse square root as sqrt(warmup / step)): to a few ulp, as
  they round differently.

The op's side (the same bits inside the fused op, on the CPU and on the CUDA grid's
host emulation) is in test_schedules_in_op.py."""

from __future__ import annotations

import copy
import io
import math
import pickle
import random

import pytest
import torch

import noam_ext
from noam_ext import (Noam, ScheduleLR, WarmupConstant, WarmupConstantLR, WarmupCosine, WarmupCosineLR,
                      WarmupInverseSqrt, WarmupInverseSqrtLR, WarmupLinear, WarmupLinearLR, WarmupStableDecay,
                      WarmupStableDecayLR)
from noam_ext.schedules import DECAY_SHAPES

from schedule_cases import LONG, SHORT, end_of, sampled_steps, short_steps  # noqa: F401 (shared cases)


# ---- the definitions, written here ------------------------------------------------------------

def megatron_factor(schedule, k: int) -> float:
    """Megatron-LM's get_lr (megatron/core/optimizer_param_scheduler.py) with
    max_lr = 1, init_lr = 0 and min_lr = min_lr_ratio, for the schedules it has;
    HF's WSD warmup starts at the floor (get_wsd_schedule), and so does ours."""
    floor = getattr(schedule, "min_lr_ratio", 0.0)
    w = schedule.warmup_steps
    if isinstance(schedule, WarmupStableDecay):
        if k < w:
            return floor + (1.0 - floor) * k / w
        decay_start = w + schedule.stable_steps
        decay_end = decay_start + schedule.decay_steps
        if k > decay_end:
            return floor
        if k <= decay_start:
            return 1.0
        ratio = (k - decay_start) / schedule.decay_steps
        coeff = {"linear": 1.0 - ratio, "cosine": 0.5 * (math.cos(math.pi * ratio) + 1.0),
                 "exponential": 2.0 * 0.5**ratio - 1.0, "1-sqrt": 1.0 - math.sqrt(ratio)}[schedule.decay]
        return floor + coeff * (1.0 - floor)
    if w > 0 and k <= w:
        return k / w
    if isinstance(schedule, WarmupConstant):
        return 1.0
    if isinstance(schedule, WarmupInverseSqrt):
        # Megatron's inverse square root is HF's with timescale = warmup_steps.
        t = schedule.timescale
        return max(floor, math.sqrt(t) / math.sqrt(k + t - w))
    total = schedule.total_steps
    if k > total:
        return floor
    ratio = (k - w) / (total - w)
    if isinstance(schedule, WarmupLinear):
        coeff = 1.0 - ratio
    else:
        coeff = 0.5 * (math.cos(2.0 * math.pi * schedule.num_cycles * ratio) + 1.0)
        if k == total:
            return floor   # the floor from the end on, whatever the cycles
    return floor + coeff * (1.0 - floor)


def paper_noam(k: int, d_model: int, warmup: int) -> float:
    s = max(k, 1)
    return d_model**-0.5 * min(s**-0.5, s * warmup**-1.5)


def reference(schedule, k: int) -> float:
    if isinstance(schedule, Noam):
        return paper_noam(k, schedule.d_model, schedule.warmup_steps)
    return megatron_factor(schedule, k)


@pytest.mark.parametrize("name", list(SHORT))
def test_every_step_of_a_short_schedule_follows_the_definition(name):
    schedule = SHORT[name]
    for k in short_steps(schedule):
        assert schedule.factor(k) == pytest.approx(reference(schedule, k), rel=4e-16 * 8, abs=1e-16 * 8), k


@pytest.mark.parametrize("name", list(LONG))
def test_sampled_steps_of_a_million_step_schedule_follow_the_definition(name):
    schedule = LONG[name]
    for k in sampled_steps(schedule):
        assert schedule.factor(k) == pytest.approx(reference(schedule, k), rel=4e-16 * 8, abs=1e-16 * 8), k


# ---- HF transformers, where installed: bit for bit ---------------------------------------------

def hf_optimization():
    try:
        from transformers import optimization
    except ImportError as error:
        pytest.skip(f"transformers is not installed (a test-only dependency): {error}")
    return optimization


def has_hf_counterpart(schedule) -> bool:
    """Whether HF transformers has a schedule of this shape (the others are compared
    with Megatron-LM's definition above): HF's linear and inverse square root have
    no floor, its WSD no exponential decay, and Noam is not in transformers."""
    if isinstance(schedule, (WarmupLinear, WarmupInverseSqrt)):
        return schedule.min_lr_ratio == 0.0
    if isinstance(schedule, WarmupStableDecay):
        return schedule.decay != "exponential"
    return isinstance(schedule, (WarmupConstant, WarmupCosine))


def hf_lambda(schedule):
    """HF's lr lambda of the same shape, made by HF's public constructor."""
    hf = hf_optimization()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    w = schedule.warmup_steps
    if isinstance(schedule, WarmupConstant):
        scheduler = hf.get_constant_schedule_with_warmup(optimizer, w)
    elif isinstance(schedule, WarmupLinear):
        scheduler = hf.get_linear_schedule_with_warmup(optimizer, w, schedule.total_steps)
    elif isinstance(schedule, WarmupCosine):
        scheduler = hf.get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, w, schedule.total_steps, num_cycles=schedule.num_cycles, min_lr_rate=schedule.min_lr_ratio)
    elif isinstance(schedule, WarmupStableDecay):
        scheduler = hf.get_wsd_schedule(optimizer, w, schedule.decay_steps, num_stable_steps=schedule.stable_steps,
                                        decay_type=schedule.decay, min_lr_ratio=schedule.min_lr_ratio)
    else:
        scheduler = hf.get_inverse_sqrt_schedule(optimizer, w, timescale=schedule.timescale)
    return scheduler.lr_lambdas[0]


def hf_domain(schedule, steps):
    """HF's cosine goes on past total_steps (a half-cosine rises again); ours stays at
    the floor there. Elsewhere HF defines every step as we do."""
    if isinstance(schedule, WarmupCosine):
        last = schedule.total_steps if schedule.num_cycles == 0.5 else schedule.total_steps - 1
        return [k for k in steps if k <= last]
    return steps


HF_CASES = {f"{length}-{name}": (schedule, steps(schedule))
            for length, table, steps in (("short", SHORT, short_steps), ("1e6", LONG, sampled_steps))
            for name, schedule in table.items() if has_hf_counterpart(schedule)}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_bit_for_bit_hf_transformers(case):
    schedule, steps = HF_CASES[case]
    hf = hf_lambda(schedule)
    for k in hf_domain(schedule, steps):
        assert schedule.factor(k) == hf(k), k


# ---- what the docs promise about each shape ----------------------------------------------------

@pytest.mark.parametrize("name", [n for n in SHORT if n != "noam"])
def test_warmup_starts_at_zero_and_reaches_one(name):
    schedule = SHORT[name]
    w = schedule.warmup_steps
    floor = schedule.min_lr_ratio if isinstance(schedule, WarmupStableDecay) else 0.0
    if w > 0:
        assert schedule.factor(0) == floor   # the first step() runs at 0 (HF, Megatron-LM)
        ramp = [schedule.factor(k) for k in range(w + 1)]
        assert all(a < b for a, b in zip(ramp, ramp[1:]))
    assert schedule.factor(w) == 1.0


@pytest.mark.parametrize("name", [n for n in SHORT if isinstance(SHORT[n], (WarmupLinear, WarmupCosine,
                                                                           WarmupStableDecay))])
def test_decays_to_the_floor_and_stays_there(name):
    schedule = SHORT[name]
    end = end_of(schedule)
    tail = [schedule.factor(k) for k in range(end, end + 100)] + [schedule.factor(2**53)]
    assert set(tail) == {schedule.min_lr_ratio}
    decay_start = schedule.warmup_steps + getattr(schedule, "stable_steps", 0)
    if getattr(schedule, "num_cycles", 0.5) == 0.5:
        decay = [schedule.factor(k) for k in range(decay_start, end + 1)]
        assert all(a > b for a, b in zip(decay, decay[1:]))
        assert decay[0] == 1.0


def test_wsd_is_flat_between_warmup_and_decay():
    schedule = WarmupStableDecay(5, 30, 10, decay="1-sqrt")
    assert {schedule.factor(k) for k in range(5, 36)} == {1.0}
    assert schedule.factor(36) < 1.0


def test_inverse_sqrt_halves_at_four_times_the_timescale():
    schedule = WarmupInverseSqrt(100)
    assert schedule.factor(400) == 0.5
    assert WarmupInverseSqrt(8, timescale=3, min_lr_ratio=0.4).factor(10**6) == 0.4
    assert WarmupInverseSqrt(0).timescale == 10_000 and WarmupInverseSqrt(0).factor(0) == 1.0


def test_pure_functions_are_the_schedules_factors():
    k = 33
    assert noam_ext.warmup_constant_lr(k, 7) == WarmupConstant(7).factor(k)
    assert noam_ext.warmup_linear_lr(k, 7, 50, 0.1) == WarmupLinear(7, 50, 0.1).factor(k)
    assert noam_ext.warmup_cosine_lr(k, 7, 50, 0.1, 1.5) == WarmupCosine(7, 50, 0.1, 1.5).factor(k)
    assert noam_ext.wsd_lr(k, 7, 10, 20, "exponential", 0.1) == WarmupStableDecay(7, 10, 20, "exponential",
                                                                                 0.1).factor(k)
    assert noam_ext.warmup_inverse_sqrt_lr(k, 7, 20, 0.1) == WarmupInverseSqrt(7, 20, 0.1).factor(k)
    assert Noam(64, 10)(k) == noam_ext.noam_lr(k, 64, 10)


# ---- arguments -----------------------------------------------------------------------------------

@pytest.mark.parametrize("make, name", [
    (lambda: WarmupConstant(-1), "warmup_steps"),
    (lambda: WarmupConstant(2.0), "warmup_steps"),
    (lambda: WarmupConstant(True), "warmup_steps"),
    (lambda: WarmupLinear(10, 10), "total_steps"),
    (lambda: WarmupLinear(10, 5), "total_steps"),
    (lambda: WarmupLinear(0, 10, min_lr_ratio=1.5), "min_lr_ratio"),
    (lambda: WarmupCosine(0, 10, min_lr_ratio=-0.1), "min_lr_ratio"),
    (lambda: WarmupCosine(0, 10, min_lr_ratio=float("nan")), "min_lr_ratio"),
    (lambda: WarmupCosine(0, 10, min_lr_ratio="0.1"), "min_lr_ratio"),
    (lambda: WarmupCosine(0, 10, num_cycles=0), "num_cycles"),
    (lambda: WarmupCosine(0, 10**60), "total_steps"),
    (lambda: WarmupStableDecay(1, 2, 0), "decay_steps"),
    (lambda: WarmupStableDecay(1, -2, 3), "stable_steps"),
    (lambda: WarmupStableDecay(1, 2, 3, decay="sqrt"), "decay"),
    (lambda: WarmupStableDecay(2**52, 2**52, 2**52), "2\\*\\*53"),
    (lambda: WarmupInverseSqrt(4, timescale=0), "timescale"),
    (lambda: WarmupInverseSqrt(4, timescale=2.5), "timescale"),
    (lambda: WarmupCosine(0, 10).factor(-1), "step"),
    (lambda: WarmupCosine(0, 10).factor(1.0), "step"),
    (lambda: WarmupCosine(0, 10).factor(2**53 + 1), "step"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_bad_arguments_raise_value_error_naming_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_numpy_and_torch_numbers_are_accepted_and_stored_as_python_numbers():
    np = pytest.importorskip("numpy")
    schedule = WarmupCosine(np.int64(5), torch.tensor(20).item(), min_lr_ratio=np.float32(0.25))
    assert type(schedule.warmup_steps) is int and type(schedule.min_lr_ratio) is float
    assert schedule == WarmupCosine(5, 20, 0.25)


# ---- Noam keeps working as it did -----------------------------------------------------------------

def test_noam_keeps_its_import_paths_equality_and_pickles():
    from noam_ext.optimizer import Noam as optimizer_noam
    assert noam_ext.Noam is optimizer_noam is Noam
    assert Noam(512) == Noam(512, 4000) and Noam(512, 10) != Noam(512, 11) and hash(Noam(512)) == hash(Noam(512))
    assert pickle.loads(pickle.dumps(Noam(64, 10))) == Noam(64, 10)
    assert Noam(64, 10).factor(3) == noam_ext.noam_lr(3, 64, 10)
    # A pickle made when Noam lived in noam_ext.optimizer still loads.
    old = pickle.dumps(Noam(64, 10)).replace(b"noam_ext.schedules", b"noam_ext.optimizer")
    assert b"noam_ext.optimizer" in old and pickle.loads(old) == Noam(64, 10)


# ---- the LambdaLR twins ----------------------------------------------------------------------------

TWINS = [
    (lambda opt, **kw: WarmupConstantLR(opt, 4, **kw), WarmupConstant(4)),
    (lambda opt, **kw: WarmupLinearLR(opt, 4, 30, min_lr_ratio=0.1, **kw), WarmupLinear(4, 30, 0.1)),
    (lambda opt, **kw: WarmupCosineLR(opt, 4, 30, min_lr_ratio=0.1, num_cycles=0.5, **kw), WarmupCosine(4, 30, 0.1)),
    (lambda opt, **kw: WarmupStableDecayLR(opt, 4, 10, 16, decay="exponential", min_lr_ratio=0.1, **kw),
     WarmupStableDecay(4, 10, 16, "exponential", 0.1)),
    (lambda opt, **kw: WarmupInverseSqrtLR(opt, 4, timescale=9, min_lr_ratio=0.1, **kw),
     WarmupInverseSqrt(4, 9, 0.1)),
    (lambda opt, **kw: ScheduleLR(opt, Noam(16, 4), **kw), Noam(16, 4)),
]
TWIN_IDS = ["constant", "linear", "cosine", "wsd", "inverse-sqrt", "noam"]


def sgd(lrs=(1.0, 0.5, 2e-3)):
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs], lr=1.0)


@pytest.mark.parametrize("make, schedule", TWINS, ids=TWIN_IDS)
def test_the_kth_optimizer_step_runs_with_the_factor_at_k_minus_one(make, schedule):
    optimizer = sgd()
    scheduler = make(optimizer)
    assert scheduler.schedule == schedule
    for k in range(1, 50):
        for group, base in zip(optimizer.param_groups, (1.0, 0.5, 2e-3)):
            assert group["lr"] == base * schedule.factor(k - 1)
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("make, schedule", TWINS, ids=TWIN_IDS)
def test_twin_state_dict_is_plain_data_and_resumes_exactly(make, schedule):
    optimizer = sgd()
    scheduler = make(optimizer)
    for _ in range(11):
        optimizer.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save({"scheduler": scheduler.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    expected = []
    for _ in range(25):
        optimizer.step()
        scheduler.step()
        expected.append(scheduler.get_last_lr())
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)   # plain data: no pickled classes
    resumed_optimizer = sgd()
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed = make(resumed_optimizer)
    resumed.load_state_dict(checkpoint["scheduler"])
    got = []
    for _ in range(25):
        resumed_optimizer.step()
        resumed.step()
        got.append(resumed.get_last_lr())
    assert got == expected
    # Or, without the scheduler's state, from the position alone.
    again = sgd()
    again.load_state_dict(checkpoint["optimizer"])
    at = make(again, last_epoch=11 - 1)
    assert at.last_epoch == 11 and at.get_last_lr() == [b * schedule.factor(11) for b in (1.0, 0.5, 2e-3)]


def test_the_twin_copies_the_schedule_it_is_given():
    schedule = WarmupCosine(4, 30)
    scheduler = ScheduleLR(sgd(), schedule)
    other = WarmupCosineLR(sgd(), 8, 60).state_dict()
    scheduler.load_state_dict(other)   # LambdaLR restores the saved settings into its lambda ...
    assert scheduler.schedule == WarmupCosine(8, 60)
    assert schedule == WarmupCosine(4, 30)   # ... not into the schedule passed in


@pytest.mark.parametrize("kwargs, name", [
    ({"schedule": lambda k: 1.0}, "schedule"),
    ({"schedule": WarmupConstant(3), "last_epoch": -2}, "last_epoch"),
    ({"schedule": WarmupConstant(3), "last_epoch": 1.0}, "last_epoch"),
])
def test_twin_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ScheduleLR(sgd(), **kwargs)


def test_twins_deepcopy_and_pickle():
    scheduler = WarmupStableDecayLR(sgd(), 2, 3, 4, decay="cosine")
    state = pickle.loads(pickle.dumps(scheduler.state_dict()))
    assert state["lr_lambdas"][0] == {"warmup_steps": 2, "stable_steps": 3, "decay_steps": 4, "decay": "cosine",
                                      "min_lr_ratio": 0.0}
    assert copy.deepcopy(scheduler.schedule) == scheduler.schedule

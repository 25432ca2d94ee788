"""TransformerLRScheduler and noam_lr against the formula, computed here independently."""

import io
import math
import pickle

import pytest
import torch

from noam_ext import TransformerLRScheduler, noam_lr, noam_peak_lr

D_MODEL, WARMUP = 512, 4000


def reference(step: int, d_model: int = D_MODEL, warmup: int = WARMUP) -> float:
    # Written from the paper, not from the implementation: float64 throughout.
    s = max(step, 1)
    return d_model ** -0.5 * min(s ** -0.5, s * warmup ** -1.5)


def make_optimizer(kind: str = "adamw", lrs=(1.0,)):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(3))], "lr": lr} for lr in lrs]
    if kind == "adamw":
        return torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-9)
    return torch.optim.SGD(groups, lr=1.0)


@pytest.mark.parametrize("step", [0, 1, WARMUP - 1, WARMUP, WARMUP + 1, 10 * WARMUP, 10**6])
def test_noam_lr_matches_formula(step):
    assert noam_lr(step, D_MODEL, WARMUP) == pytest.approx(reference(step), rel=1e-15, abs=0)


def test_step_zero_is_step_one():
    assert noam_lr(0, D_MODEL, WARMUP) == noam_lr(1, D_MODEL, WARMUP)


def test_peak_is_at_warmup_and_matches_paper():
    assert noam_peak_lr(D_MODEL, WARMUP) == pytest.approx(6.987712429686844e-4, rel=1e-12)
    lrs = [noam_lr(s, D_MODEL, WARMUP) for s in range(1, 3 * WARMUP)]
    assert max(lrs) == lrs[WARMUP - 1]


def test_rises_monotonically_then_falls():
    rising = [noam_lr(s, D_MODEL, WARMUP) for s in range(1, WARMUP + 1)]
    falling = [noam_lr(s, D_MODEL, WARMUP) for s in range(WARMUP, 20 * WARMUP, 7)]
    assert all(a < b for a, b in zip(rising, rising[1:]))
    assert all(a > b for a, b in zip(falling, falling[1:]))


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_lambda_lr_loop_gives_documented_lr_at_each_optimizer_step(kind):
    warmup = 50
    optimizer = make_optimizer(kind, lrs=(1.0, 0.5, 2.0))
    scheduler = TransformerLRScheduler(optimizer, d_model=64, warmup_steps=warmup)
    for k in range(1, 4 * warmup):
        # The lr the k-th optimizer.step() uses is lambda(k - 1), lambda(0) == lambda(1).
        for group, base in zip(optimizer.param_groups, (1.0, 0.5, 2.0)):
            expected = base * reference(k - 1, 64, warmup)
            assert group["lr"] == pytest.approx(expected, rel=1e-14)
        optimizer.step()
        scheduler.step()
        assert scheduler.get_last_lr() == [g["lr"] for g in optimizer.param_groups]


def test_get_lr_and_get_last_lr_after_construction():
    optimizer = make_optimizer()
    scheduler = TransformerLRScheduler(optimizer, d_model=D_MODEL, warmup_steps=WARMUP)
    assert scheduler.get_last_lr() == [pytest.approx(reference(0))]
    assert scheduler.last_epoch == 0
    assert optimizer.param_groups[0]["initial_lr"] == 1.0


def test_state_dict_round_trip_mid_schedule_through_torch_save():
    warmup = 20
    optimizer = make_optimizer()
    scheduler = TransformerLRScheduler(optimizer, d_model=128, warmup_steps=warmup)
    for _ in range(33):
        optimizer.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save({"scheduler": scheduler.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    expected = []
    for _ in range(40):
        optimizer.step()
        scheduler.step()
        expected.append(scheduler.get_last_lr()[0])

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed_optimizer = make_optimizer()
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed = TransformerLRScheduler(resumed_optimizer, d_model=128, warmup_steps=warmup)
    resumed.load_state_dict(checkpoint["scheduler"])
    assert resumed.last_epoch == 33
    got = []
    for _ in range(40):
        resumed_optimizer.step()
        resumed.step()
        got.append(resumed.get_last_lr()[0])
    assert got == expected


def test_state_dict_is_picklable_and_has_no_bound_method():
    scheduler = TransformerLRScheduler(make_optimizer(), d_model=D_MODEL)
    state = scheduler.state_dict()
    pickle.dumps(state)
    assert all(not callable(v) for v in state.values())
    assert state["lr_lambdas"] == [{"d_model": D_MODEL, "warmup_steps": WARMUP}]


def test_resume_with_last_epoch():
    optimizer = make_optimizer()
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    scheduler = TransformerLRScheduler(optimizer, d_model=D_MODEL, warmup_steps=WARMUP, last_epoch=99)
    assert scheduler.last_epoch == 100
    assert scheduler.get_last_lr()[0] == pytest.approx(reference(100))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"d_model": 0}, "d_model"),
        ({"d_model": -8}, "d_model"),
        ({"d_model": 512.0}, "d_model"),
        ({"d_model": "512"}, "d_model"),
        ({"d_model": True}, "d_model"),
        ({"d_model": 512, "warmup_steps": 0}, "warmup_steps"),
        ({"d_model": 512, "warmup_steps": -1}, "warmup_steps"),
        ({"d_model": 512, "warmup_steps": 4000.5}, "warmup_steps"),
        ({"d_model": 512, "last_epoch": -2}, "last_epoch"),
    ],
    ids=lambda x: str(x),
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TransformerLRScheduler(make_optimizer(), **kwargs)


def test_numpy_and_torch_integers_are_accepted():
    np = pytest.importorskip("numpy")
    scheduler = TransformerLRScheduler(make_optimizer(), d_model=np.int64(256), warmup_steps=10)
    assert scheduler.d_model == 256 and isinstance(scheduler.d_model, int)
    assert math.isclose(noam_lr(5, 256, 10), reference(5, 256, 10), rel_tol=1e-15)


def test_noam_lr_rejects_negative_step():
    with pytest.raises(ValueError, match="step"):
        noam_lr(-1, D_MODEL, WARMUP)

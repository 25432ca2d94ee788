"""Numerical parity of FusedAdamW (+ in-op Noam) with torch.optim.AdamW(foreach=False)
+ TransformerLRScheduler, on a real torch.nn.Transformer, from identical initial
weights and identical gradients, compared at every step.

Tolerances, per dtype, and why:
  float64, float32: exp_avg, exp_avg_sq (and max_exp_avg_sq) must be bit-identical:
    the moment updates use the same fused multiply-adds as torch's kernels
    (docs/adamw.md, "Rounding"). Parameters may differ by a few ulp: torch's CPU
    Tensor.sqrt (MKL VML on x86) is not correctly rounded, ours is IEEE sqrt. Measured
    over 300 steps: float32 max |diff| 2.4e-7 on weights up to 1.7 (about 2 ulp), so
    rtol=atol=2e-6 (float32) and 1e-13 (float64) leave ~10x headroom while catching
    any real mistake (a wrong bias correction or lr is off by > 1e-3 relative).
  bfloat16, float16: torch's for-loop rounds to the storage type after every
    operation; we round once per step (like torch's fused=True). The two are not
    expected to agree bit for bit, so each is measured against a float64 run from the
    same weights and gradients, and ours must deviate no more than 1.25x what torch's
    own low-precision run deviates (max and mean over all parameters).
"""

from __future__ import annotations

import copy
import io
import warnings
from dataclasses import dataclass

import pytest
import torch

from noam_ext import FusedAdamW, Noam, TransformerLRScheduler, param_groups

D_MODEL, WARMUP, STEPS = 32, 50, 300
BETAS, EPS = (0.9, 0.98), 1e-9

EXACT_STATE_TOL = {torch.float64: 0.0, torch.float32: 0.0}
PARAM_TOL = {torch.float64: 1e-13, torch.float32: 2e-6}


def small_transformer(dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested-tensor notice of nn.Transformer
        model = torch.nn.Transformer(d_model=D_MODEL, nhead=4, num_encoder_layers=2,
                                     num_decoder_layers=2, dim_feedforward=64, dropout=0.0)
    return model.to(dtype)


def grouped(model, layout: str) -> list[dict]:
    groups = param_groups(model, weight_decay=0.01)
    if layout == "three_groups":
        # Three groups with different hyperparameters: split the decayed weights.
        decay = groups[0]["params"]
        groups = [
            {"params": decay[: len(decay) // 2], "weight_decay": 0.05, "lr": 2.0, "betas": (0.85, 0.99)},
            {"params": decay[len(decay) // 2:], "weight_decay": 0.01, "eps": 1e-6},
            {"params": groups[1]["params"], "weight_decay": 0.0, "lr": 0.5},
        ]
    return groups


@dataclass
class Pair:
    """The same model trained by torch (reference) and by noam_ext."""
    torch_params: list
    ours_params: list
    torch_opt: torch.optim.Optimizer
    torch_sched: TransformerLRScheduler
    ours_opt: FusedAdamW

    def set_grads(self, grads, skip: set[int] = frozenset()):
        for i, (a, b, g) in enumerate(zip(self.torch_params, self.ours_params, grads)):
            a.grad = None if i in skip else g.clone()
            b.grad = None if i in skip else g.clone()

    def step(self):
        self.torch_opt.step()
        self.torch_sched.step()
        self.ours_opt.step()


def make_pair(dtype, layout="two_groups", amsgrad=False, maximize=False, seed=0, eps=EPS) -> Pair:
    reference = small_transformer(dtype, seed)
    ours = copy.deepcopy(reference)
    torch_groups, our_groups = grouped(reference, layout), grouped(ours, layout)
    kwargs = dict(lr=1.0, betas=BETAS, eps=eps, amsgrad=amsgrad, maximize=maximize)
    torch_opt = torch.optim.AdamW(torch_groups, foreach=False, **kwargs)
    torch_sched = TransformerLRScheduler(torch_opt, d_model=D_MODEL, warmup_steps=WARMUP)
    ours_opt = FusedAdamW(our_groups, schedule=Noam(D_MODEL, WARMUP), **kwargs)
    flatten = lambda groups: [p for g in groups for p in g["params"]]  # noqa: E731
    return Pair(flatten(torch_groups), flatten(our_groups), torch_opt, torch_sched, ours_opt)


def random_grads(params, generator, dtype):
    # Drawn in float64 and rounded once, so every run sees the same gradient values.
    return [torch.randn(p.shape, generator=generator, dtype=torch.float64).to(dtype) for p in params]


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def assert_same_state(pair: Pair, dtype, step: int):
    """Parameters within PARAM_TOL, state tensors within EXACT_STATE_TOL, steps equal.
    Compared as one concatenated vector per kind (fast), located on failure."""
    def check(ours, theirs, tol, what):
        a, b = flat(theirs), flat(ours)
        if not torch.allclose(b, a, rtol=tol, atol=tol):
            for index, (x, y) in enumerate(zip(theirs, ours)):
                torch.testing.assert_close(y, x, rtol=tol, atol=tol,
                                           msg=lambda m: f"{what} of param {index} at step {step}: {m}")
    check(pair.ours_params, pair.torch_params, PARAM_TOL[dtype], "value")
    states = [(pair.torch_opt.state.get(a, {}), pair.ours_opt.state.get(b, {}))
              for a, b in zip(pair.torch_params, pair.ours_params)]
    for index, (sa, sb) in enumerate(states):
        assert sa.keys() == sb.keys(), f"state keys of param {index} at step {step}"
    with_state = [(sa, sb) for sa, sb in states if sa]
    for key in with_state[0][0] if with_state else ():
        theirs = [sa[key] for sa, _ in with_state if key in sa]
        ours = [sb[key] for _, sb in with_state if key in sb]
        if key == "step":
            assert [float(s) for s in ours] == [float(s) for s in theirs], f"steps at step {step}"
        else:
            check(ours, theirs, EXACT_STATE_TOL[dtype], key)


FULL_PRECISION_CASES = [
    pytest.param(dtype, layout, amsgrad, maximize,
                 id=f"{str(dtype).split('.')[-1]}-{layout}{'-amsgrad' if amsgrad else ''}{'-maximize' if maximize else ''}")
    for dtype in (torch.float64, torch.float32)
    for layout, amsgrad, maximize in [("two_groups", False, False), ("two_groups", True, False),
                                      ("two_groups", False, True), ("three_groups", False, False)]
]


@pytest.mark.parametrize("dtype, layout, amsgrad, maximize", FULL_PRECISION_CASES)
def test_parity_every_step_across_the_warmup_peak(dtype, layout, amsgrad, maximize):
    pair = make_pair(dtype, layout, amsgrad, maximize)
    generator = torch.Generator().manual_seed(1)
    for step in range(1, STEPS + 1):
        pair.set_grads(random_grads(pair.torch_params, generator, dtype))
        pair.step()
        assert_same_state(pair, dtype, step)
        assert pair.ours_opt.get_last_lr() == pytest.approx(pair.torch_sched.get_last_lr(), rel=1e-15)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_parameter_without_gradient_in_some_steps_is_skipped_like_torch(dtype):
    pair = make_pair(dtype)
    generator = torch.Generator().manual_seed(2)
    n = len(pair.torch_params)
    for step in range(1, 121):
        # Param 0 gets no gradient on every third step, params 3 and 4 not before step 40.
        skip = {0} if step % 3 == 0 else set()
        if step < 40:
            skip |= {3, 4}
        pair.set_grads(random_grads(pair.torch_params, generator, dtype), skip)
        pair.step()
        assert_same_state(pair, dtype, step)
    assert float(pair.ours_opt.state[pair.ours_params[0]]["step"]) == 120 - 40
    assert float(pair.ours_opt.state[pair.ours_params[3]]["step"]) == 120 - 39
    assert n > 5


def deviation(params, reference):
    diffs = [(p.double() - r.double()).abs() for p, r in zip(params, reference)]
    return max(d.max().item() for d in diffs), torch.cat([d.flatten() for d in diffs]).mean().item()


@pytest.mark.parametrize("dtype, eps", [
    pytest.param(torch.bfloat16, 1e-9, id="bfloat16"),
    # torch's float16 for-loop run overflows with eps=1e-9 (eps rounds to 0 in float16 and
    # tiny second moments underflow); 1e-4 keeps the reference run finite.
    pytest.param(torch.float16, 1e-4, id="float16"),
])
def test_low_precision_deviates_from_float64_no_more_than_torch(dtype, eps):
    generator = torch.Generator().manual_seed(3)
    pair = make_pair(dtype, eps=eps)
    reference = make_pair(torch.float64, eps=eps)  # its torch side is the float64 reference
    for step in range(1, STEPS + 1):
        grads = [torch.randn(p.shape, generator=generator, dtype=torch.float64).to(dtype)
                 for p in pair.torch_params]
        pair.set_grads(grads)
        reference.set_grads([g.double() for g in grads])
        pair.step()
        reference.torch_opt.step()
        reference.torch_sched.step()
        if step % 50 == 0:
            torch_max, torch_mean = deviation(pair.torch_params, reference.torch_params)
            ours_max, ours_mean = deviation(pair.ours_params, reference.torch_params)
            assert ours_max <= 1.25 * torch_max + 1e-6, (step, ours_max, torch_max)
            assert ours_mean <= 1.25 * torch_mean + 1e-7, (step, ours_mean, torch_mean)
            for p in pair.ours_params:
                for value in pair.ours_opt.state[p].values():
                    assert torch.isfinite(value).all()


def test_float16_stays_finite_where_torchs_for_loop_overflows():
    # Documented difference: we compute in float32 and round once, so eps=1e-9 works in float16.
    pair = make_pair(torch.float16)
    generator = torch.Generator().manual_seed(4)
    for _ in range(30):
        pair.set_grads(random_grads(pair.torch_params, generator, torch.float16))
        pair.step()
    assert all(torch.isfinite(p).all() for p in pair.ours_params)


# ---- checkpoints both ways ---------------------------------------------------------------

def save_and_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
def test_state_dict_round_trip_mid_training_continues_on_the_same_trajectory(direction, amsgrad):
    dtype = torch.float64
    pair = make_pair(dtype, amsgrad=amsgrad)
    generator = torch.Generator().manual_seed(5)
    all_grads = [random_grads(pair.torch_params, generator, dtype) for _ in range(80)]
    for grads in all_grads[:35]:   # mid-warmup (warmup is 50)
        pair.set_grads(grads)
        pair.step()
    model_state = save_and_load({
        "weights": [p.detach().clone() for p in pair.torch_params],
        "torch_opt": pair.torch_opt.state_dict(),
        "torch_sched": pair.torch_sched.state_dict(),
        "ours_opt": pair.ours_opt.state_dict(),
    })
    # A fresh pair, whose optimizers swap checkpoints.
    fresh = make_pair(dtype, amsgrad=amsgrad, seed=123)
    with torch.no_grad():
        for a, b, w in zip(fresh.torch_params, fresh.ours_params, model_state["weights"]):
            a.copy_(w)
            b.copy_(w)
    # Each optimizer loads its own copy: like torch.optim.AdamW, FusedAdamW adopts the
    # loaded tensors as they are (no copy), so two optimizers loading one object would
    # share their moments and steps.
    if direction == "torch_to_ours":
        fresh.ours_opt.load_state_dict(copy.deepcopy(model_state["torch_opt"]))
        fresh.torch_opt.load_state_dict(model_state["torch_opt"])
        fresh.torch_sched.load_state_dict(model_state["torch_sched"])
    else:
        ours_state = model_state["ours_opt"]
        fresh.torch_opt.load_state_dict(copy.deepcopy(ours_state))
        fresh.torch_sched = TransformerLRScheduler(
            fresh.torch_opt, d_model=D_MODEL, warmup_steps=WARMUP,
            last_epoch=ours_state["noam_schedule_step"] - 1)
        fresh.ours_opt.load_state_dict(ours_state)
    assert fresh.ours_opt.get_last_lr() == pytest.approx(fresh.torch_sched.get_last_lr(), rel=1e-15)
    for step, grads in enumerate(all_grads[35:], start=36):
        pair.set_grads(grads)
        pair.step()
        fresh.set_grads(grads)
        fresh.step()
        assert_same_state(fresh, dtype, step)
    for a, b in zip(pair.ours_params, fresh.ours_params):
        torch.testing.assert_close(b, a, rtol=1e-13, atol=1e-13)

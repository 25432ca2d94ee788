"""FusedAdamW.clip_grad_norm_: torch.nn.utils.clip_grad_norm_ fused into the next
step(), checked against clip_grad_norm_ + torch.optim.AdamW(foreach=False) every
step: several groups, dtypes, None gradients, clipping active and inactive, norm
types 2 and inf, and torch.amp.GradScaler.

Tolerances. On the CPU the 2-norm of float32/float64 gradients comes from
noam_ext::grad_norm (tests/cpu_op/test_grad_norm.py), which sums the squares in float64
in an order of its own: it agrees with torch's to rounding (rtol 1e-6 in float32,
1e-12 in float64), not bit for bit. The inf-norm (also the op's) is exact, and
the other norms and dtypes use torch's own get_total_norm: both agree exactly.
(With a GradScaler, ours is the scaled gradients' norm times the power-of-two inverse scale, exact.) The
clipping factor inherits the norm's rounding; the step then multiplies each gradient by the factor as it reads it,
in the math type: in float32 and float64 that is torch's `grad * coef` rounded
once, so parameters differ only by the square root's last bits as in the parity
tests (1e-6 / 1e-12). In bfloat16 torch rounds `grad * coef` to bfloat16 before the
step and we do not, so parameters may part by a bfloat16 ulp or so per step (2e-2)."""

from __future__ import annotations

import pytest
import torch

from noam_ext import FusedAdamW

TOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 2e-2}
KW = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-9)


def twins(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (5,), (3, 4), (4,)]
    base = [torch.randn(s, generator=generator, dtype=torch.float64).to(dtype) for s in shapes]
    ours = [torch.nn.Parameter(t.clone()) for t in base]
    theirs = [torch.nn.Parameter(t.clone()) for t in base]
    groups = lambda ps: [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}]  # noqa: E731
    return ours, theirs, FusedAdamW(groups(ours), **KW), torch.optim.AdamW(groups(theirs), foreach=False, **KW)


@pytest.mark.parametrize("norm_type", [2.0, float("inf")], ids=["l2", "inf"])
@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clipping", "not-clipping"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["float32", "float64", "bfloat16"])
def test_matches_clip_grad_norm_and_torch_adamw_every_step(dtype, max_norm, norm_type):
    ours, theirs, opt, ref = twins(dtype)
    generator = torch.Generator().manual_seed(1)
    for step in range(12):
        grads = [3 * torch.randn(p.shape, generator=generator, dtype=torch.float64).to(dtype) for p in ours]
        for params in (ours, theirs):
            for i, (p, g) in enumerate(zip(params, grads)):
                p.grad = None if (step % 4 == 3 and i == 1) else g.clone()   # a None gradient now and then
        before = [p.grad.clone() for p in ours if p.grad is not None]
        norm = opt.clip_grad_norm_(max_norm, norm_type)
        expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
        exact = norm_type != 2.0 or dtype == torch.bfloat16
        torch.testing.assert_close(norm, expected, rtol=0 if exact else TOL[dtype], atol=0)
        assert all(torch.equal(p.grad, b) for p, b in zip([p for p in ours if p.grad is not None], before))
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=TOL[dtype], atol=TOL[dtype])
            for key, value in ref.state[b].items():
                torch.testing.assert_close(opt.state[a][key].to(value.dtype), value, rtol=TOL[dtype], atol=TOL[dtype])


def test_the_factor_applies_to_the_next_step_only():
    ours, theirs, opt, ref = twins(torch.float32)
    for step in range(3):
        grads = [torch.randn(p.shape) for p in ours]
        for params in (ours, theirs):
            for p, g in zip(params, grads):
                p.grad = g.clone()
        if step == 0:
            opt.clip_grad_norm_(0.1)
            torch.nn.utils.clip_grad_norm_(theirs, 0.1)
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-6)


def test_with_grad_scaler_equals_unscale_clip_step_and_skips_inf_steps():
    ours, theirs, opt, ref = twins(torch.float32)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) for _ in range(2)]
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(6, 5, generator=generator)
    for step in range(8):
        for params, o, scaler in ((ours, opt, scalers[0]), (theirs, ref, scalers[1])):
            o.zero_grad()
            loss = (params[0] @ x.t()).square().sum() + params[1].sum() + params[2].square().sum() + params[3].sum()
            scaler.scale(loss).backward()
            if step == 4:
                params[0].grad.view(-1)[0] = float("inf")
            if o is opt:
                norm = o.clip_grad_norm_(1.0, scaler=scaler)
            else:
                scaler.unscale_(o)
                expected = torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(o)
            scaler.update()
        if step != 4:
            torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-6)
    assert scalers[0].get_scale() == scalers[1].get_scale()
    assert float(opt.state[ours[0]]["step"]) == float(ref.state[theirs[0]]["step"]) == 7.0


def test_skip_if_nonfinite_skips_the_whole_step():
    ours, _, opt, _ = twins(torch.float32)
    for p in ours:
        p.grad = torch.ones_like(p)
    opt.step()
    for p in ours:
        p.grad = torch.ones_like(p)
    ours[2].grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in ours] + [t.clone() for st in opt.state.values() for t in st.values()]
    norm = opt.clip_grad_norm_(1.0, skip_if_nonfinite=True)
    assert torch.isnan(norm)
    opt.step()
    after = [p.detach().clone() for p in ours] + [t.clone() for st in opt.state.values() for t in st.values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_error_if_nonfinite_raises_like_torch():
    ours, theirs, opt, _ = twins(torch.float32)
    for params in (ours, theirs):
        for p in params:
            p.grad = torch.full_like(p, float("inf"))
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.clip_grad_norm_(1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(theirs, 1.0, error_if_nonfinite=True)


def test_no_gradients_gives_a_zero_norm_and_a_plain_step():
    ours, _, opt, _ = twins(torch.float32)
    assert float(opt.clip_grad_norm_(1.0)) == 0.0
    opt.step()
    assert len(opt.state) == 0


def test_a_step_that_raises_keeps_the_clip_for_the_step_that_follows():
    # The clip belongs to the next step that runs: a step refused for a bad state tensor
    # changes nothing, the clip included, so the retried step is the clipped one.
    ours, theirs, opt, ref = twins(torch.float32)
    generator = torch.Generator().manual_seed(3)
    grads = [3 * torch.randn(p.shape, generator=generator) for p in ours]
    for params in (ours, theirs):
        for p, g in zip(params, grads):
            p.grad = g.clone()
    opt.step()
    ref.step()
    opt.clip_grad_norm_(0.5)
    torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    good = opt.state[ours[0]]["exp_avg"]
    opt.state[ours[0]]["exp_avg"] = torch.zeros(7)
    with pytest.raises(RuntimeError, match="exp_avg"):
        opt.step()
    opt.state[ours[0]]["exp_avg"] = good
    opt.step()
    ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=TOL[torch.float32], atol=TOL[torch.float32])

"""Property tests: random layouts against torch.optim.AdamW(foreach=False), step by
step. Hypothesis draws 1-30 parameters (0-element and 0-dim ones included), 1-4
param groups with random hyperparameters, the dtype, which gradients are None at
each step, and how each gradient is set (autograd, assignment, in-place write).
derandomize=True and a fixed example count keep CI deterministic.

Tolerances, per dtype:
- float64: rtol=atol=1e-12. Both compute in float64; the only difference is the
  square root (torch's CPU sqrt is not always correctly rounded, ours is): a few
  ulp per step, far inside 1e-12 over six steps.
- float32: rtol=atol=1e-5, the same reason in float32 (ulp 6e-8), with room for
  the few-ulp differences to reach the parameter through the division.
- bfloat16: rtol=atol=6e-2. Ours computes the step in float32 and rounds once per
  step; torch's for-loop rounds to bfloat16 after every operation, so the two may
  part by a few bfloat16 ulps (2**-8 = 0.4% each) per step, over six steps.
"""

from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is a test dependency (pip install hypothesis)")
from hypothesis import given, settings, strategies as st  # noqa: E402

from noam_ext import FusedAdamW  # noqa: E402

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 6e-2}
SHAPES = st.one_of(st.just(()), st.just((0,)), st.just((2, 0)), st.tuples(st.integers(1, 9)),
                   st.tuples(st.integers(1, 5), st.integers(1, 7)))
GROUP = st.fixed_dictionaries({
    "lr": st.floats(1e-4, 1e-1),
    "beta1": st.floats(0.0, 0.99),
    "beta2": st.floats(0.5, 0.999),
    "eps": st.sampled_from([1e-9, 1e-8, 1e-6]),
    "weight_decay": st.sampled_from([0.0, 0.01, 0.3]),
    "amsgrad": st.booleans(),
    "maximize": st.booleans(),
})
HOW = ("autograd", "assign", "in-place", "none")


@st.composite
def layouts(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    shapes = draw(st.lists(SHAPES, min_size=1, max_size=30))
    groups = draw(st.lists(GROUP, min_size=1, max_size=min(4, len(shapes))))
    membership = [draw(st.integers(0, len(groups) - 1)) for _ in shapes]
    steps = draw(st.integers(1, 6))
    how = [[draw(st.sampled_from(HOW)) for _ in shapes] for _ in range(steps)]
    seed = draw(st.integers(0, 2**16))
    return dtype, shapes, groups, membership, how, seed


def build(params, groups, membership):
    out = []
    for index, group in enumerate(groups):
        members = [p for p, g in zip(params, membership) if g == index]
        if members:
            out.append({"params": members, "lr": group["lr"], "betas": (group["beta1"], group["beta2"]),
                        "eps": group["eps"], "weight_decay": group["weight_decay"],
                        "amsgrad": group["amsgrad"], "maximize": group["maximize"]})
    return out


def give_gradient(p, g, how):
    if how == "none":
        p.grad = None
    elif how == "assign":
        p.grad = g.clone()
    elif how == "in-place":
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.copy_(g)
    else:   # autograd: d/dp sum(p * g) = g, accumulated onto a cleared gradient
        p.grad = None
        (p * g).sum().backward()


@settings(max_examples=150, derandomize=True, deadline=None)
@given(layouts())
def test_random_layouts_match_torch_adamw_every_step(layout):
    dtype, shapes, groups, membership, how, seed = layout
    generator = torch.Generator().manual_seed(seed)
    base = [torch.randn(s, generator=generator, dtype=torch.float64).to(dtype) for s in shapes]
    ours = [torch.nn.Parameter(t.clone()) for t in base]
    theirs = [torch.nn.Parameter(t.clone()) for t in base]
    opt = FusedAdamW(build(ours, groups, membership))
    ref = torch.optim.AdamW(build(theirs, groups, membership), foreach=False)
    tol = TOLERANCE[dtype]
    for step, ways in enumerate(how):
        grads = [torch.randn(s, generator=generator, dtype=torch.float64).to(dtype) for s in shapes]
        for params in (ours, theirs):
            for p, g, way in zip(params, grads, ways):
                give_gradient(p, g, way)
        opt.step()
        ref.step()
        for i, (a, b) in enumerate(zip(ours, theirs)):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=tol, atol=tol,
                                       msg=lambda m: f"step {step}, parameter {i}: {m}")
            assert (a in opt.state) == (b in ref.state), f"step {step}, parameter {i}: state created differently"
            for key, value in ref.state.get(b, {}).items():
                torch.testing.assert_close(opt.state[a][key].to(value.dtype), value, rtol=tol, atol=tol,
                                           msg=lambda m: f"step {step}, parameter {i}, {key}: {m}")

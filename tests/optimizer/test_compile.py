"""torch.compile: optimizer.step compiles into one graph (fullgraph=True) that gives
exactly the eager step's bits, and a compiled training step (forward, backward and
step) trains like the eager one. Dynamo follows a Python path of FusedAdamW.step()
(the C++ fast path is opaque to it) that calls the same op."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo.testing

from noam_ext import (FusedAdamW, Noam, WarmupConstant, WarmupCosine, WarmupInverseSqrt, WarmupLinear,
                      WarmupStableDecay)


def model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.GELU(),
                               torch.nn.Linear(16, 4))


def groups(m):
    params = list(m.parameters())
    return [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0, "amsgrad": True}]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_step_is_one_graph_and_bitwise_equal_to_eager():
    eager_model, compiled_model = model(), model()
    eager = FusedAdamW(groups(eager_model), lr=1.0, schedule=Noam(16, 4))
    compiled = FusedAdamW(groups(compiled_model), lr=1.0, schedule=Noam(16, 4))
    step = torch.compile(compiled.step, fullgraph=True)   # fails on any graph break
    x = torch.randn(32, 8)
    for _ in range(6):   # the first compiled step also creates the state
        for m, opt, run in ((eager_model, eager, eager.step), (compiled_model, compiled, step)):
            opt.zero_grad()
            m(x).square().mean().backward()
            run()
    for a, b in zip(eager_model.parameters(), compiled_model.parameters()):
        assert torch.equal(a, b)
        for key, value in eager.state[a].items():
            assert torch.equal(compiled.state[b][key], value), key
    assert compiled.state_dict()["noam_schedule_step"] == eager.state_dict()["noam_schedule_step"] == 6


def test_compiled_training_step_trains_like_eager():
    eager_model, compiled_model = model(), model()
    eager = FusedAdamW(eager_model.parameters(), lr=1e-2)
    compiled = FusedAdamW(compiled_model.parameters(), lr=1e-2)
    x, y = torch.randn(32, 8), torch.randn(32, 4)

    def train_step(m, opt):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(m(x), y)
        loss.backward()
        opt.step()
        return loss

    compiled_step = torch.compile(train_step)
    for _ in range(5):
        eager_loss = train_step(eager_model, eager)
        compiled_loss = compiled_step(compiled_model, compiled)
    # Compiled forward and backward kernels may round differently from eager ones.
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert float(compiled.state[next(compiled_model.parameters())]["step"]) == 5.0


# Each crosses its switch points (end of warmup, start of decay, end) within STEPS.
SCHEDULES = {
    "constant": WarmupConstant(3),
    "linear": WarmupLinear(3, 12, min_lr_ratio=0.1),
    "cosine": WarmupCosine(3, 12, min_lr_ratio=0.1),
    "wsd": WarmupStableDecay(3, 4, 6, decay="1-sqrt", min_lr_ratio=0.1),
    "inverse-sqrt": WarmupInverseSqrt(3, timescale=5),
}
STEPS = 16


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_each_schedule_gives_the_eager_bits_and_its_lr_advances_without_recompiling(name):
    schedule = SCHEDULES[name]
    eager_model, compiled_model = model(), model()
    eager = FusedAdamW(groups(eager_model), lr=1e-2, schedule=schedule)
    compiled = FusedAdamW(groups(compiled_model), lr=1e-2, schedule=schedule)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    step = torch.compile(compiled.step, fullgraph=True, backend=counter)
    x = torch.randn(32, 8)
    compiles_after_warm_up = None
    for k in range(1, STEPS + 1):
        for m, opt, run in ((eager_model, eager, eager.step), (compiled_model, compiled, step)):
            opt.zero_grad()
            m(x).square().mean().backward()
            run()
        if k == 2:   # the first step creates the state, the second sees it: two compiles
            compiles_after_warm_up = counter.frame_count
        # The lr changes at every step here; a compiled step that did not advance it
        # (or that baked it in) would leave the eager trajectory at once.
        for a, b in zip(eager_model.parameters(), compiled_model.parameters()):
            assert torch.equal(a, b), k
    assert 1 <= compiles_after_warm_up <= 2 and counter.frame_count == compiles_after_warm_up
    assert compiled.state_dict()["noam_schedule_step"] == STEPS

"""torch.amp.GradScaler integration (on the CPU here; tests/gpu_kernels/test_cuda.py repeats
it on a GPU): the scaler hands its scale and found-inf tensors to the op, which
unscales in the math type and skips a step with inf/NaN gradients whole."""

import pytest
import torch

from noam_ext import FusedAdamW, Noam, TransformerLRScheduler


def model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def test_grad_scaler_matches_torch_adamw_and_skips_inf_steps():
    ours_model, ref_model = model(), model()
    ours = FusedAdamW(ours_model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9,
                      schedule=Noam(d_model=16, warmup_steps=5))
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9, foreach=False)
    ref_sched = TransformerLRScheduler(ref, d_model=16, warmup_steps=5)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 12) for _ in range(2)]
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    for step in range(12):
        for m, opt, scaler in ((ours_model, ours, scalers[0]), (ref_model, ref, scalers[1])):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            scaler.scale(loss).backward()
            if step in (3, 7):
                next(m.parameters()).grad.view(-1)[0] = float("inf")   # an overflowed step
            before = [p.detach().clone() for p in m.parameters()]
            scaler.step(opt)
            scaler.update()
            if step in (3, 7):
                assert all(torch.equal(p.detach(), b) for p, b in zip(m.parameters(), before))
        ref_sched.step()   # torch's scheduler steps every iteration; our schedule advances too
        for a, b in zip(ours_model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=2e-6, atol=2e-6)
    assert scalers[0].get_scale() == scalers[1].get_scale() < 2.0 ** 12
    steps = {float(s["step"]) for s in ours.state.values()}
    assert steps == {10.0}   # two of twelve steps were skipped
    assert ours.get_last_lr() == pytest.approx(ref_sched.get_last_lr(), rel=1e-15)


def test_gradients_stay_scaled_after_scaler_step_as_documented():
    m = model()
    opt = FusedAdamW(m.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    scaler.scale(m(torch.randn(4, 8)).sum()).backward()
    grads = [p.grad.clone() for p in m.parameters()]
    scaler.step(opt)
    assert all(torch.equal(p.grad, g) for p, g in zip(m.parameters(), grads))

"""An LR scheduler next to the in-op schedule: with schedule=Noam(...) the op computes
the lr and group["lr"] is a mirror the optimizer writes. An lr written there by
anything else (a torch LR scheduler, a trainer's default one, a hand edit) is an
error raised by step() before anything changes, naming the group, both values and
both ways out. The ways out work: the scheduler driving group["lr"] without
schedule=, or InOpScheduleLR, which writes nothing and reports the lr the op uses.
What the optimizer writes itself (construction, steps, load_state_dict,
add_param_group, copies, compiled steps) is never mistaken for an outside write.

References and tolerances: the scheduler-driven way out is compared with
torch.optim.AdamW(foreach=False) + the same scheduler as tests/optimizer/test_parity.py does it:
lrs and float32 moments bit for bit, parameters within 2e-6 (torch's CPU sqrt is not
correctly rounded, ours is: a few ulp, measured up to 2.4e-7 there). The in-op
schedule evaluates noam_lr with the same pow() calls as the host, so it is compared
bit for bit with our own op given the lr by TransformerLRScheduler."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import noam_ext
from noam_ext import FusedAdamW, InOpScheduleLR, Noam, TransformerLRScheduler, noam_lr

D_MODEL, WARMUP = 64, 8
PARAM_TOL = 2e-6   # float32 parameters against torch's for-loop (see the module docstring)


def reproducer():
    """The issue's reproducer, up to the step."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = FusedAdamW([p], lr=0.1, schedule=Noam(D_MODEL, WARMUP))
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    p.grad = torch.ones(3)
    return p, opt, sch


def snapshot(opt):
    """Everything a step could change: parameters, state, schedule counters and position."""
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    counters = {d: c.clone() for d, c in opt._schedule_counters.items()}
    return params, state, counters, opt._schedule_steps_done


def assert_unchanged(before, opt):
    after = snapshot(opt)
    for a, b in zip(before[0], after[0]):
        assert torch.equal(a, b)
    assert before[1].keys() == after[1].keys()
    for key, entries in before[1].items():
        for name, value in entries.items():
            assert torch.equal(value, after[1][key][name]), name
    assert before[2].keys() == after[2].keys()
    for device, counter in before[2].items():
        assert torch.equal(counter, after[2][device])
    assert before[3] == after[3]


def test_the_reproducer_raises_naming_group_values_and_both_ways_out():
    p, opt, sch = reproducer()
    before = snapshot(opt)
    with pytest.raises(RuntimeError) as info:
        opt.step()
    message = str(info.value)
    assert "param group 0" in message
    assert "lr is 0.1," in message                                   # the value found
    assert repr(noam_lr(0, D_MODEL, WARMUP) * 0.1) in message         # the value expected
    assert "drop schedule=" in message and "TransformerLRScheduler" in message    # way out 1
    assert "noam_ext.InOpScheduleLR(optimizer)" in message                          # way out 2
    assert "optimizers=(optimizer, noam_ext.InOpScheduleLR(optimizer))" in message  # for HF Trainer
    assert_unchanged(before, opt)
    assert torch.equal(p.detach(), torch.ones(3))
    assert len(opt.state) == 0 and opt._schedule_counters == {}
    with pytest.raises(RuntimeError, match="param group 0"):   # and again: it is not a one-off
        opt.step()


def test_a_scheduler_attached_mid_run_raises_and_changes_nothing_nor_calls_the_closure():
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(4, 3))]
    opt = FusedAdamW([{"params": params[:1]}, {"params": params[1:], "lr": 0.5}], lr=1.0,
                     schedule=Noam(D_MODEL, WARMUP))
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()   # StepLR's construction wrote back the lrs it found: equal values, not an error
    sched.step()   # halves group["lr"]
    opt.clip_grad_norm_(0.1)
    before = snapshot(opt)
    calls = []
    with pytest.raises(RuntimeError, match="param group 0"):
        opt.step(lambda: calls.append(1))
    assert calls == []
    assert_unchanged(before, opt)
    assert opt._pending_clip is not None   # the clip waits for the step that will happen


def test_the_error_names_the_group_that_was_written():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = FusedAdamW([{"params": [a]}, {"params": [b], "lr": 0.3}], lr=1.0, schedule=Noam(D_MODEL, WARMUP))
    expected = 0.3 * noam_lr(0, D_MODEL, WARMUP)
    opt.param_groups[1]["lr"] = 2e-3   # a hand edit
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    with pytest.raises(RuntimeError, match=rf"param group 1's lr is 0.002, .* set it to {expected!r}"):
        opt.step()


def test_writing_the_mirrors_own_value_and_editing_initial_lr_are_not_errors():
    ours, theirs = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    opt = FusedAdamW([ours], lr=1.0, schedule=Noam(D_MODEL, WARMUP))
    ref = FusedAdamW([theirs], lr=1.0)   # the same op, lr given by hand
    for k in range(6):
        if k == 3:
            opt.param_groups[0]["initial_lr"] = 4.0   # the base lr the op reads
        opt.param_groups[0]["lr"] = float(opt.param_groups[0]["lr"])   # an equal value, written again
        ref.param_groups[0]["lr"] = (4.0 if k >= 3 else 1.0) * noam_lr(k, D_MODEL, WARMUP)
        ours.grad, theirs.grad = torch.full((4,), 0.5), torch.full((4,), 0.5)
        opt.step(), ref.step()
        assert torch.equal(ours.detach(), theirs.detach())
    assert opt.get_last_lr() == [4.0 * noam_lr(6, D_MODEL, WARMUP)]


def test_a_tensor_lr_changed_in_place_by_a_scheduler_is_detected():
    p = torch.nn.Parameter(torch.ones(3))
    opt = FusedAdamW([p], lr=torch.tensor(0.1), schedule=Noam(D_MODEL, WARMUP))
    p.grad = torch.ones(3)
    opt.step()
    torch.optim.lr_scheduler.ConstantLR(opt, factor=0.5)   # fills the Tensor lr in place
    with pytest.raises(RuntimeError, match=r"param group 0's lr is .* \(a Tensor\)"):
        opt.step()


# ---- way out 1: no schedule=, the scheduler drives group["lr"] --------------------------

def twin_params(seed=0):
    torch.manual_seed(seed)
    base = [torch.randn(7, 3), torch.randn(11)]
    return [torch.nn.Parameter(b.clone()) for b in base], [torch.nn.Parameter(b.clone()) for b in base]


def give_grads(*param_lists, seed):
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(p.shape, generator=g) for p in param_lists[0]]
    for params in param_lists:
        for p, grad in zip(params, grads):
            p.grad = grad.clone()


@pytest.mark.parametrize("make_scheduler", [
    lambda opt: TransformerLRScheduler(opt, D_MODEL, WARMUP),
    lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / 10)),   # HF's "linear"
], ids=["noam", "linear"])
def test_without_schedule_a_scheduler_drives_it_as_torch_adamw(make_scheduler):
    ours, theirs = twin_params()
    opt = FusedAdamW(ours, lr=0.5, weight_decay=0.1)
    ref = torch.optim.AdamW(theirs, lr=0.5, weight_decay=0.1, foreach=False)
    sched_ours, sched_ref = make_scheduler(opt), make_scheduler(ref)
    for k in range(8):
        give_grads(ours, theirs, seed=k)
        opt.step(), ref.step()
        sched_ours.step(), sched_ref.step()
        assert sched_ours.get_last_lr() == sched_ref.get_last_lr()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=PARAM_TOL, atol=PARAM_TOL)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[a][key], ref.state[b][key]), key


# ---- way out 2: InOpScheduleLR -------------------------------------------------------------

def in_op_and_twin(lr=0.5):
    """FusedAdamW with the in-op schedule + InOpScheduleLR, and its twin: FusedAdamW
    without schedule driven by TransformerLRScheduler (the lr given from the host)."""
    ours, theirs = twin_params()
    opt = FusedAdamW([{"params": ours[:1]}, {"params": ours[1:], "lr": 2 * lr}], lr=lr,
                     schedule=Noam(D_MODEL, WARMUP))
    twin = FusedAdamW([{"params": theirs[:1]}, {"params": theirs[1:], "lr": 2 * lr}], lr=lr)
    return ours, opt, InOpScheduleLR(opt), theirs, twin, TransformerLRScheduler(twin, D_MODEL, WARMUP)


def test_in_op_schedule_lr_reports_the_lr_actually_used():
    ours, opt, sched, theirs, twin, twin_sched = in_op_and_twin()
    assert sched.get_last_lr() == twin_sched.get_last_lr()
    for k in range(12):
        used = list(sched.get_last_lr())   # what a trainer logs for this step
        assert used == [g["lr"] for g in twin.param_groups]   # the lr the twin's op is given
        give_grads(ours, theirs, seed=k)
        opt.step(), twin.step()
        sched.step(), twin_sched.step()
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)   # so the in-op lr was exactly `used`
    assert sched.get_last_lr() == twin_sched.get_last_lr() == opt.get_last_lr()
    assert sched.last_epoch == twin_sched.last_epoch == 12


def test_in_op_schedule_lr_writes_nothing_even_to_a_tensor_lr():
    p = torch.nn.Parameter(torch.ones(3))
    opt = FusedAdamW([p], lr=torch.tensor(0.1), schedule=Noam(D_MODEL, WARMUP))
    sched = InOpScheduleLR(opt)
    for k in range(4):
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
        last = sched.get_last_lr()[0]
        assert isinstance(last, torch.Tensor) and last is not opt.param_groups[0]["lr"]   # a copy
        assert float(last) == pytest.approx(0.1 * noam_lr(k + 1, D_MODEL, WARMUP), rel=1e-6)


def test_in_op_schedule_lr_state_dict_round_trip_resumes_exactly():
    ours, opt, sched, theirs, twin, twin_sched = in_op_and_twin()
    for k in range(5):
        give_grads(ours, theirs, seed=k)
        opt.step(), twin.step(), sched.step(), twin_sched.step()
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)   # plain data: loads without pickled code

    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    resumed = FusedAdamW([{"params": resumed_params[:1]}, {"params": resumed_params[1:], "lr": 1.0}], lr=0.5,
                         schedule=Noam(D_MODEL, WARMUP))
    resumed_sched = InOpScheduleLR(resumed)
    resumed.load_state_dict(saved["opt"])
    resumed_sched.load_state_dict(saved["sched"])
    assert resumed_sched.get_last_lr() == sched.get_last_lr()
    for k in range(5, 9):
        give_grads(ours, theirs, resumed_params, seed=k)
        for o, s in ((opt, sched), (twin, twin_sched), (resumed, resumed_sched)):
            o.step(), s.step()
        assert resumed_sched.get_last_lr() == sched.get_last_lr() == twin_sched.get_last_lr()
    for a, b in zip(resumed_params, ours):
        assert torch.equal(a, b)
    assert pickle.loads(pickle.dumps(sched.state_dict())) == sched.state_dict()


def test_in_op_schedule_lr_needs_an_in_op_schedule():
    p = torch.nn.Parameter(torch.ones(3))
    for opt in (FusedAdamW([p], lr=0.1), torch.optim.AdamW([p], lr=0.1)):
        with pytest.raises(ValueError, match="InOpScheduleLR needs a noam_ext.FusedAdamW with an in-op schedule"):
            InOpScheduleLR(opt)
        assert opt.param_groups[0]["lr"] == 0.1 and "initial_lr" not in opt.param_groups[0]


def test_in_op_schedule_lr_is_exported():
    assert noam_ext.InOpScheduleLR is InOpScheduleLR and "InOpScheduleLR" in noam_ext.__all__
    assert issubclass(InOpScheduleLR, torch.optim.lr_scheduler.LRScheduler)


# ---- what the optimizer writes itself is not an outside write -------------------------

def stepped(steps=3, lr=0.5):
    params, _ = twin_params()
    opt = FusedAdamW(params, lr=lr, schedule=Noam(D_MODEL, WARMUP))
    for k in range(steps):
        give_grads(params, seed=k)
        opt.step()
    return params, opt


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_steps_and_still_catches_outside_writes(how):
    copy_of = copy.deepcopy if how == "deepcopy" else (lambda o: pickle.loads(pickle.dumps(o)))
    params, opt = stepped()
    clone = copy_of(opt)
    clone_params = clone.param_groups[0]["params"]
    give_grads(params, clone_params, seed=10)
    opt.step(), clone.step()   # no false error
    for a, b in zip(params, clone_params):
        assert torch.equal(a, b)
    opt.param_groups[0]["lr"] = 1e-3   # written from outside before the copy: the copy knows
    with pytest.raises(RuntimeError, match="param group 0"):
        copy_of(opt).step()


def test_a_copied_optimizer_with_a_tensor_lr_steps():
    # A copy continues the original's schedule: its second step gives the bits of an
    # optimizer that took both steps itself.
    def made(steps):
        p = torch.nn.Parameter(torch.arange(3.0))
        opt = FusedAdamW([p], lr=torch.tensor(0.1), schedule=Noam(D_MODEL, WARMUP))
        for _ in range(steps):
            p.grad = torch.ones(3)
            opt.step()
        return p, opt

    expected, _ = made(2)
    _, opt = made(1)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        p = clone.param_groups[0]["params"][0]
        p.grad = torch.ones(3)
        clone.step()
        assert torch.equal(p, expected)
        assert clone.state[p]["step"].item() == 2.0


def test_load_state_dict_then_step():
    # A reloaded optimizer's next step is the uninterrupted one's, bit for bit.
    params, opt = stepped()
    uninterrupted = [p.detach().clone() for p in params]
    saved = copy.deepcopy(opt.state_dict())
    give_grads(params, seed=20)
    opt.step()
    uninterrupted, after = [p.detach().clone() for p in params], uninterrupted
    with torch.no_grad():
        for p, value in zip(params, after):
            p.copy_(value)
    fresh = FusedAdamW(params, lr=0.5, schedule=Noam(D_MODEL, WARMUP))
    fresh.load_state_dict(saved)
    give_grads(params, seed=20)
    fresh.step()
    assert all(torch.equal(p, q) for p, q in zip(params, uninterrupted))
    # A torch.optim.AdamW checkpoint (its lr is a scheduler's value) loads and steps on from its
    # moments: after one more step of each, on the same gradients, the moments and steps are
    # torch's, bit for bit (the moments do not depend on the lr).
    ours_params, theirs = twin_params()
    torch_opt = torch.optim.AdamW(theirs, lr=0.5)
    torch_sched = TransformerLRScheduler(torch_opt, D_MODEL, WARMUP)
    give_grads(theirs, seed=0)
    torch_opt.step()
    torch_sched.step()
    ours = FusedAdamW(ours_params, lr=0.5, schedule=Noam(D_MODEL, WARMUP))
    with torch.no_grad():
        for p, q in zip(ours_params, theirs):
            p.copy_(q)
    ours.load_state_dict(torch_opt.state_dict())
    give_grads(ours_params, theirs, seed=1)
    ours.step()
    torch_opt.step()
    for p, q in zip(ours_params, theirs):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(ours.state[p][key].cpu(), torch_opt.state[q][key].cpu()), key


def test_add_param_group_then_step_uses_and_shows_the_scheduled_lr():
    params, opt = stepped(steps=3)
    ref_params, ref = stepped(steps=3)
    extra, ref_extra = torch.nn.Parameter(torch.ones(6)), torch.nn.Parameter(torch.ones(6))
    opt.add_param_group({"params": [extra], "lr": 2.0})
    assert opt.param_groups[1]["initial_lr"] == 2.0
    assert opt.param_groups[1]["lr"] == 2.0 * noam_lr(3, D_MODEL, WARMUP)   # the lr its first step uses
    ref.add_param_group({"params": [ref_extra], "lr": 2.0})
    twin = FusedAdamW([torch.nn.Parameter(torch.ones(6))], lr=2.0 * noam_lr(3, D_MODEL, WARMUP))
    for o, ps in ((opt, params + [extra]), (ref, ref_params + [ref_extra]), (twin, twin.param_groups[0]["params"])):
        give_grads(ps[-1:], seed=30)
        for p in ps[:-1]:
            p.grad = None
        o.step()   # no false error
    assert torch.equal(extra.detach(), twin.param_groups[0]["params"][0].detach())


def test_a_bad_added_group_leaves_the_mirror_as_it_was():
    params, opt = stepped(steps=1)
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "lr": -1.0})
    give_grads(params, seed=40)
    opt.step()


def test_a_compiled_step_then_an_eager_step_is_not_an_error():
    torch._dynamo.reset()
    try:
        params, opt = stepped(steps=1)
        compiled = torch.compile(opt.step, fullgraph=True)
        for k in range(2):
            give_grads(params, seed=50 + k)
            compiled()
        give_grads(params, seed=60)
        opt.step()
        assert opt.state_dict()["noam_schedule_step"] == 4
    finally:
        torch._dynamo.reset()


@pytest.mark.cuda
def test_cuda_graph_replays_then_an_eager_step_is_not_an_error():
    device = torch.device("cuda")
    model = torch.nn.Linear(16, 8).to(device)
    opt = FusedAdamW(model.parameters(), lr=1.0, schedule=Noam(D_MODEL, WARMUP))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()   # outside the graph: creates the state and the device tables
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(3):
        graph.replay()
    opt.step()   # no false error: replays leave the mirror as the capture's step() wrote it
    opt.param_groups[0]["lr"] = 1e-3
    with pytest.raises(RuntimeError, match="param group 0"):
        opt.step()

"""FusedAdamW as a drop-in torch.optim.AdamW: arguments, param groups, closures,
zero_grad and gradient rules, hyperparameter changes, odd sizes, bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from noam_ext import FusedAdamW, Noam, TransformerLRScheduler


def twin_params(shapes, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    base = [torch.randn(s, dtype=dtype) for s in shapes]
    return ([torch.nn.Parameter(t.clone()) for t in base], [torch.nn.Parameter(t.clone()) for t in base])


def assign(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def assert_params_close(ours, theirs, tol=2e-6):
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=tol, atol=tol)


# ---- sizes that break vectorisation -------------------------------------------------------

@pytest.mark.parametrize("shapes", [
    pytest.param([(0,)], id="empty"),
    pytest.param([(1,)], id="1"),
    pytest.param([(3,)], id="3"),
    pytest.param([(4097,)], id="4097"),
    pytest.param([(0,), (1,), (3,), (4097,), (17, 5), (2, 3, 4), (1,), (65,)], id="mix"),
    pytest.param([(70001,)], id="70001-spans-threads"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_odd_sizes_match_torch(shapes, dtype):
    ours, theirs = twin_params(shapes, dtype)
    opt = FusedAdamW(ours, lr=1e-2, amsgrad=True)
    ref = torch.optim.AdamW(theirs, lr=1e-2, amsgrad=True, foreach=False)
    for step in range(10):
        grads = [torch.randn(p.shape, dtype=dtype) for p in ours]
        assign(ours, grads)
        assign(theirs, grads)
        opt.step()
        ref.step()
    assert_params_close(ours, theirs, 2e-6 if dtype == torch.float32 else 1e-13)
    for a, b in zip(ours, theirs):
        assert torch.equal(opt.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_low_precision_odd_sizes_follow_float32_math(dtype):
    # One rounding per step: equal to running the float32 update and rounding the result.
    shapes = [(1,), (3,), (4097,), (31,)]
    low, _ = twin_params(shapes, dtype)
    high = [torch.nn.Parameter(p.detach().float()) for p in low]
    opt_low, opt_high = FusedAdamW(low, lr=1e-2), FusedAdamW(high, lr=1e-2)
    grads = [torch.randn(p.shape).to(dtype) for p in low]
    assign(low, grads)
    assign(high, [g.float() for g in grads])
    opt_low.step()
    opt_high.step()
    for a, b in zip(low, high):
        assert torch.equal(a.detach(), b.detach().to(dtype))


# ---- the optimizer interface --------------------------------------------------------------

def test_defaults_and_param_group_keys_match_torch_adamw():
    p = torch.nn.Parameter(torch.zeros(2))
    ours = FusedAdamW([p]).param_groups[0]
    theirs = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]).param_groups[0]
    assert ours.keys() == theirs.keys()
    assert {k: v for k, v in ours.items() if k != "params"} == {k: v for k, v in theirs.items() if k != "params"}


def test_closure_is_called_with_grad_enabled_and_its_loss_returned():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = FusedAdamW([w], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(5.0)
    assert torch.all(w.detach().abs() < torch.tensor([1.0, 2.0]))


def test_add_param_group_and_hyperparameter_changes_take_effect():
    ours, theirs = twin_params([(5,), (7,)])
    opt = FusedAdamW([ours[0]], lr=1e-2)
    ref = torch.optim.AdamW([theirs[0]], lr=1e-2, foreach=False)
    for step in range(12):
        if step == 4:
            opt.add_param_group({"params": [ours[1]], "lr": 3e-2, "weight_decay": 0.1})
            ref.add_param_group({"params": [theirs[1]], "lr": 3e-2, "weight_decay": 0.1})
        if step == 8:
            for o in (opt, ref):
                o.param_groups[0]["lr"] = 5e-3
                o.param_groups[0]["betas"] = (0.8, 0.95)
                o.param_groups[1]["maximize"] = True
        grads = [torch.randn(p.shape) for p in ours]
        assign(ours, grads)
        assign(theirs, grads)
        opt.step()
        ref.step()
        assert_params_close(ours, theirs)


def test_torch_lambda_lr_drives_it_without_a_schedule():
    ours, theirs = twin_params([(33,)])
    opt = FusedAdamW(ours, lr=1.0, betas=(0.9, 0.98), eps=1e-9)
    ref = torch.optim.AdamW(theirs, lr=1.0, betas=(0.9, 0.98), eps=1e-9, foreach=False)
    sched_ours = TransformerLRScheduler(opt, d_model=16, warmup_steps=10)
    sched_ref = TransformerLRScheduler(ref, d_model=16, warmup_steps=10)
    for _ in range(30):
        grads = [torch.randn(33)]
        assign(ours, grads)
        assign(theirs, grads)
        opt.step()
        ref.step()
        sched_ours.step()
        sched_ref.step()
    assert_params_close(ours, theirs)
    assert sched_ours.get_last_lr() == sched_ref.get_last_lr()


def test_in_op_schedule_lr_is_readable_without_stepping_the_device():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = FusedAdamW([p], lr=2.0, schedule=Noam(d_model=64, warmup_steps=10))
    from noam_ext import noam_lr
    assert opt.get_last_lr() == [2.0 * noam_lr(0, 64, 10)]
    assert opt.param_groups[0]["initial_lr"] == 2.0
    for k in range(1, 25):
        p.grad = torch.ones(4)
        opt.step()
        assert opt.get_last_lr() == [2.0 * noam_lr(k, 64, 10)]
        assert opt.param_groups[0]["lr"] == 2.0 * noam_lr(k, 64, 10)


# ---- gradients: zero-copy views, None grads, replaced grads -------------------------------

def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def test_common_loop_reads_gradients_where_autograd_left_them_and_matches_torch():
    ours_model, ref_model = mlp(), mlp()
    opt = FusedAdamW(ours_model.parameters(), lr=1e-2)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, foreach=False)
    x = torch.randn(16, 6)
    for _ in range(20):
        for model, o in ((ours_model, opt), (ref_model, ref)):
            o.zero_grad()
            model(x).pow(2).mean().backward()
            o.step()
    # The optimizer takes over nothing: parameters keep their own storage, zero_grad()
    # leaves .grad None as torch does, and the next backward's gradients are read in place.
    storages = [p.untyped_storage().data_ptr() for p in ours_model.parameters()]
    assert len(set(storages)) == len(storages)
    opt.zero_grad()
    assert all(p.grad is None for p in ours_model.parameters())
    assert_params_close(list(ours_model.parameters()), list(ref_model.parameters()))


def test_parameter_unused_by_backward_is_skipped_after_zero_grad():
    ours_model, ref_model = mlp(), mlp()
    extra_ours = torch.nn.Parameter(torch.ones(5))
    extra_ref = torch.nn.Parameter(torch.ones(5))
    opt = FusedAdamW(list(ours_model.parameters()) + [extra_ours], lr=1e-2, weight_decay=0.5)
    ref = torch.optim.AdamW(list(ref_model.parameters()) + [extra_ref], lr=1e-2, weight_decay=0.5, foreach=False)
    x = torch.randn(4, 6)
    for step in range(6):
        for model, extra, o in ((ours_model, extra_ours, opt), (ref_model, extra_ref, ref)):
            o.zero_grad()
            loss = model(x).sum()
            if step == 2:
                loss = loss + extra.sum()   # the extra parameter takes part once
            loss.backward()
            o.step()
    torch.testing.assert_close(extra_ours.detach(), extra_ref.detach())
    assert float(opt.state[extra_ours]["step"]) == float(ref.state[extra_ref]["step"]) == 1.0
    assert_params_close(list(ours_model.parameters()), list(ref_model.parameters()))


def test_model_zero_grad_matches_torch():
    ours_model, ref_model = mlp(), mlp()
    opt = FusedAdamW(ours_model.parameters(), lr=1e-2)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, foreach=False)
    x = torch.randn(8, 6)
    for step in range(8):
        for model, o in ((ours_model, opt), (ref_model, ref)):
            model.zero_grad()  # sets .grad to None: autograd allocates fresh gradients
            model(x).pow(2).sum().backward()
            o.step()
    assert_params_close(list(ours_model.parameters()), list(ref_model.parameters()))


def test_zero_grad_set_to_none_false_keeps_zero_gradients_active_like_torch():
    ours, theirs = twin_params([(4,)])
    opt = FusedAdamW(ours, lr=1e-2, weight_decay=0.3)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.3, foreach=False)
    assign(ours, [torch.ones(4)])
    assign(theirs, [torch.ones(4)])
    opt.step(), ref.step()
    opt.zero_grad(set_to_none=False)
    ref.zero_grad(set_to_none=False)
    opt.step(), ref.step()   # zero gradients: decay and moment decay still apply
    assert_params_close(ours, theirs)
    assert float(opt.state[ours[0]]["step"]) == 2.0


def test_mixed_dtypes_share_one_schedule_counter():
    a = torch.nn.Parameter(torch.randn(5))
    b = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    c = torch.nn.Parameter(torch.randn(7, dtype=torch.bfloat16))
    opt = FusedAdamW([a, b, c], lr=1e-2, schedule=Noam(d_model=8, warmup_steps=4))
    for _ in range(3):
        for p in (a, b, c):
            p.grad = torch.ones_like(p)
        opt.step()
    assert all(float(opt.state[p]["step"]) == 3.0 for p in (a, b, c))
    assert [c.tolist() for c in opt._schedule_counters.values()] == [[3]]   # one per device, advanced once a step


# ---- bad input: clear errors, nothing touched ---------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"lr": -1.0}, "Invalid learning rate"),
    ({"eps": -1e-8}, "Invalid epsilon value"),
    ({"betas": (1.0, 0.999)}, "Invalid beta parameter at index 0"),
    ({"betas": (0.9, -0.1)}, "Invalid beta parameter at index 1"),
    ({"betas": 0.9}, "Invalid betas"),
    ({"weight_decay": -0.1}, "Invalid weight_decay value"),
    ({"lr": "fast"}, "Invalid lr"),
    ({"schedule": 512}, "schedule"),
    ({"differentiable": True}, "differentiable"),
    ({"lr": torch.tensor(0.1), "foreach": True}, "lr as a Tensor is not supported"),
    ({"lr": torch.tensor([0.1, 0.2])}, "Tensor lr must be 1-element"),
    ({"betas": (torch.tensor(0.9), 0.999)}, "betas must be either both floats or both Tensors"),
    ({"betas": (torch.tensor(0.9), torch.tensor(0.99)), "foreach": True}, r"betas\[0\] as a Tensor"),
], ids=lambda x: str(x))
def test_bad_arguments_raise_like_torch(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FusedAdamW([torch.nn.Parameter(torch.zeros(2))], **kwargs)


@pytest.mark.parametrize("kwargs", [
    {"lr": torch.tensor(0.1), "foreach": True},
    {"betas": (torch.tensor(0.9), 0.999)},
    {"betas": (torch.tensor(0.9), torch.tensor(0.99)), "foreach": True},
], ids=["tensor-lr-foreach", "mixed-betas", "tensor-betas-foreach"])
def test_tensor_hyperparameter_checks_match_torchs(kwargs):
    messages = []
    for make in (FusedAdamW, torch.optim.AdamW):
        with pytest.raises(ValueError) as error:
            make([torch.nn.Parameter(torch.zeros(2))], **kwargs)
        messages.append(str(error.value))
    assert messages[0] == messages[1]


def test_torch_adam_state_dict_loads_as_decoupled_adamw():
    ours, theirs = twin_params([(3,)])
    adam = torch.optim.Adam(theirs, lr=1e-2, weight_decay=0.1)
    assign(theirs, [torch.ones(3)])
    adam.step()
    opt = FusedAdamW(ours, lr=1e-2)
    opt.load_state_dict(adam.state_dict())
    assert opt.param_groups[0]["decoupled_weight_decay"] is True
    reference = torch.optim.AdamW(twin_params([(3,)])[1], lr=1e-2)
    reference.load_state_dict(adam.state_dict())
    assert reference.param_groups[0]["decoupled_weight_decay"] is True


def test_bad_noam_arguments_name_the_argument():
    with pytest.raises(ValueError, match="d_model"):
        Noam(d_model=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        Noam(d_model=512, warmup_steps=2.5)
    with pytest.raises(ValueError, match="warmup_steps must be at most 2"):
        Noam(d_model=512, warmup_steps=10**30)


def test_unsupported_parameter_dtype_is_named():
    p = torch.tensor([1, 2, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"parameter 0 of param group 0 .*int32"):
        FusedAdamW([p])


def test_bad_group_hyperparameter_set_between_steps_leaves_everything_untouched():
    ours, _ = twin_params([(6,), (3,)])
    opt = FusedAdamW([{"params": [ours[0]]}, {"params": [ours[1]]}], lr=1e-2)
    assign(ours, [torch.ones(6), torch.ones(3)])
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    values = [p.detach().clone() for p in ours]
    opt.param_groups[1]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match="beta parameter at index 1 in param group 1"):
        opt.step()
    for p, v in zip(ours, values):
        assert torch.equal(p.detach(), v)
    after = opt.state_dict()
    for key in before["state"]:
        for name, value in before["state"][key].items():
            assert torch.equal(after["state"][key][name], value)


# ---- situations found in review ------------------------------------------------------------

def run_pair(make_opt_kwargs, steps, loop):
    ours_model, ref_model = mlp(), mlp()
    extra = [torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))]
    opt = FusedAdamW(list(ours_model.parameters()) + [extra[0]], **make_opt_kwargs)
    ref = torch.optim.AdamW(list(ref_model.parameters()) + [extra[1]], foreach=False, **make_opt_kwargs)
    for step in range(steps):
        loop(step, (ours_model, extra[0], opt), (ref_model, extra[1], ref))
    torch.testing.assert_close(extra[0].detach(), extra[1].detach())
    assert_params_close(list(ours_model.parameters()), list(ref_model.parameters()))
    return opt, ref, extra


@pytest.mark.parametrize("set_to_none", [True, False])
def test_frozen_parameter_is_untouched_and_trains_once_unfrozen(set_to_none):
    x = torch.randn(4, 6)

    def loop(step, *sides):
        for model, extra, o in sides:
            if step == 0:
                extra.requires_grad_(False)
            if step == 3:
                extra.requires_grad_(True)
            o.zero_grad(set_to_none=set_to_none)
            loss = model(x).sum() + (extra.square().sum() if extra.requires_grad else 0)
            loss.backward()
            o.step()
    opt, ref, extra = run_pair(dict(lr=1e-2, weight_decay=0.5), 8, loop)
    assert float(opt.state[extra[0]]["step"]) == float(ref.state[extra[1]]["step"]) == 5.0


def test_tensor_lr_changed_in_place_by_a_torch_scheduler():
    ours, theirs = twin_params([(6,)])
    opt = FusedAdamW(ours, lr=torch.tensor(0.1))
    ref = torch.optim.AdamW(theirs, lr=torch.tensor(0.1), foreach=False)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (opt, ref)]
    for _ in range(5):
        grads = [torch.randn(6)]
        assign(ours, grads)
        assign(theirs, grads)
        opt.step(), ref.step()
        for s in scheds:
            s.step()
    assert_params_close(ours, theirs)


def test_replacing_param_data_is_followed():
    ours, theirs = twin_params([(5,), (3,)])
    opt = FusedAdamW(ours, lr=1e-2)
    ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    for step in range(6):
        if step == 3:
            for p in ours + theirs:
                p.data = p.data.clone()   # what module.to() / .half() do
        grads = [torch.randn(5), torch.randn(3)]
        assign(ours, grads)
        assign(theirs, grads)
        opt.step(), ref.step()
    assert_params_close(ours, theirs)


def test_deepcopy_and_pickle_give_a_working_optimizer():
    import pickle
    ours, theirs = twin_params([(7,)])
    opt = FusedAdamW(ours, lr=1.0, schedule=Noam(d_model=16, warmup_steps=4))
    ref = torch.optim.AdamW(theirs, lr=1.0, foreach=False)
    sched = TransformerLRScheduler(ref, d_model=16, warmup_steps=4)
    for _ in range(3):
        assign(ours, [torch.ones(7)])
        assign(theirs, [torch.ones(7)])
        opt.step(), ref.step(), sched.step()
    clone = copy.deepcopy(opt)
    assert pickle.loads(pickle.dumps(opt)).schedule == opt.schedule
    clone_param = clone.param_groups[0]["params"][0]
    clone_param.grad = torch.ones(7)
    assign(theirs, [torch.ones(7)])
    clone.step(), ref.step()
    torch.testing.assert_close(clone_param.detach(), theirs[0].detach())
    sched.step()
    assert clone.get_last_lr() == pytest.approx(sched.get_last_lr(), rel=1e-15)


def test_bad_added_group_leaves_the_optimizer_usable():
    ours, _ = twin_params([(3,), (2,)])
    opt = FusedAdamW([ours[0]], lr=1e-2)
    with pytest.raises(ValueError, match="Invalid learning rate in param group 1"):
        opt.add_param_group({"params": [ours[1]], "lr": -1.0})
    assert len(opt.param_groups) == 1
    ours[0].grad = torch.ones(3)
    opt.step()


def test_group_added_between_backward_and_step_keeps_missing_gradients_missing():
    x = torch.randn(4, 6)
    late = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))]

    def loop(step, *sides):
        for side, (model, extra, o) in enumerate(sides):
            o.zero_grad()
            loss = model(x).sum() + (extra.sum() if step == 0 else 0)
            loss.backward()
            if step == 2:
                o.add_param_group({"params": [late[side]], "weight_decay": 0.2})
            o.step()
    run_pair(dict(lr=1e-2, weight_decay=0.5), 5, loop)
    torch.testing.assert_close(late[0].detach(), late[1].detach())


def test_many_param_groups():
    ours, theirs = twin_params([(3,)] * 40)
    opt = FusedAdamW([{"params": [p], "lr": 1e-3 * (i + 1)} for i, p in enumerate(ours)])
    ref = torch.optim.AdamW([{"params": [p], "lr": 1e-3 * (i + 1)} for i, p in enumerate(theirs)], foreach=False)
    for _ in range(3):
        grads = [torch.randn(3) for _ in ours]
        assign(ours, grads)
        assign(theirs, grads)
        opt.step(), ref.step()
    assert_params_close(ours, theirs)


def test_groups_spanning_dtypes_use_their_own_hyperparameters():
    # Buffers hold only their own groups' rows: group 0 is only in the float64 buffer, so the
    # float32 buffer's row 0 is group 1 (a mix-up would give its parameter group 0's lr and betas).
    torch.manual_seed(3)
    base = [torch.randn(4, dtype=torch.float64), torch.randn(5, dtype=torch.float64), torch.randn(6)]
    ours = [torch.nn.Parameter(t.clone()) for t in base]
    theirs = [torch.nn.Parameter(t.clone()) for t in base]
    spec = lambda ps: [{"params": ps[:1], "lr": 1e-2}, {"params": ps[1:], "lr": 3e-2, "betas": (0.8, 0.9)}]  # noqa: E731
    opt, ref = FusedAdamW(spec(ours)), torch.optim.AdamW(spec(theirs), foreach=False)
    for _ in range(5):
        grads = [torch.randn_like(t) for t in base]
        assign(ours, grads)
        assign(theirs, grads)
        opt.step(), ref.step()
    assert_params_close(ours, theirs, tol=1e-6)


def test_malformed_betas_set_between_steps_is_a_clear_error():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = FusedAdamW([p])
    opt.param_groups[0]["betas"] = 0.9
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="Invalid betas in param group 0"):
        opt.step()
    assert torch.equal(p.detach(), torch.zeros(3))


def test_meta_device_parameters_are_a_clear_error():
    p = torch.nn.Parameter(torch.empty(3, device="meta"))
    opt = FusedAdamW([p])
    p.grad = torch.empty(3, device="meta")
    with pytest.raises(RuntimeError, match="no meta implementation .*parameters on meta cannot be optimised"):
        opt.step()
    assert len(opt.state) == 0


def test_steady_state_step_allocates_no_memory_on_the_cpu():
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(64, 32), (32,), (7,)]]
    opt = FusedAdamW([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}],
                     lr=1.0, schedule=Noam(d_model=16, warmup_steps=4))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()   # the first step creates the state
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(3):
            opt.step()
    allocations = [e for e in prof.events() if e.name == "[memory]" and e.cpu_memory_usage > 0]
    assert allocations == []


def _trained(shapes=((4, 3), (5,)), amsgrad=False, schedule=None):
    params, _ = twin_params(list(shapes))
    opt = FusedAdamW(params, lr=1e-2, amsgrad=amsgrad, schedule=schedule)
    assign(params, [torch.randn(s) for s in shapes])
    opt.step()
    return params, opt


def _snapshot(params, opt):
    tensors = [p.detach().clone() for p in params]
    for state in opt.state.values():
        tensors += [v.detach().clone() for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


@pytest.mark.parametrize("corrupt, message", [
    (lambda sd: sd["state"][1].pop("exp_avg_sq"), r"state of parameter 1 of param group 0 \(shape \(5,\)\) has no 'exp_avg_sq'"),
    (lambda sd: sd["state"][0].__setitem__("exp_avg", torch.zeros(3, 4)), r"'exp_avg' of parameter 0 of param group 0 \(shape \(4, 3\)\) has shape \(3, 4\)"),
    (lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])), "different number of parameter groups"),
    (lambda sd: sd["param_groups"][0].__setitem__("params", [0]), "doesn't match the size"),
], ids=["missing-moment", "wrong-shape", "group-count", "group-size"])
def test_load_state_dict_checks_everything_before_replacing_anything(corrupt, message):
    params, opt = _trained()
    other_params, other = _trained()
    state_dict = copy.deepcopy(other.state_dict())
    corrupt(state_dict)
    before = _snapshot(params, opt)
    groups_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(state_dict)
    after = _snapshot(params, opt)
    assert len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups_before


def test_state_that_lacks_a_moment_fails_at_the_next_step_like_torch_and_changes_nothing():
    params, opt = _trained()
    del opt.state[params[1]]["exp_avg_sq"]
    assign(params, [torch.ones(4, 3), torch.ones(5)])
    before = _snapshot(params, opt)
    with pytest.raises(KeyError, match=r"parameter 1 of param group 0 .* has no 'exp_avg_sq'"):
        opt.step()
    after = _snapshot(params, opt)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_load_state_dict_with_a_schedule_tolerates_non_parameter_state_keys():
    params, opt = _trained(schedule=Noam(d_model=16, warmup_steps=4))
    state_dict = opt.state_dict()
    fresh = FusedAdamW(params, lr=1e-2, schedule=Noam(d_model=16, warmup_steps=4))
    fresh.register_load_state_dict_post_hook(lambda o: o.state.__setitem__("loaded_by_hook", True))
    fresh.load_state_dict(state_dict)
    fresh.state["another_flag"] = False
    fresh.load_state_dict(state_dict)
    assert fresh.get_last_lr() == opt.get_last_lr()
    assign(params, [torch.ones(4, 3), torch.ones(5)])
    fresh.step()

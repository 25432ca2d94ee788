"""Every way torch users and wrappers touch an optimizer, run side by side on
FusedAdamW and torch.optim.AdamW(foreach=False): the same parameters, gradients,
state, step counts and errors. Each test is one idiom (the numbered ones are the
cases of the issue "A true drop-in": 1-7, 9 and 11 here; 8 and 10, ZeRO and
FSDP2, are in test_distributed.py).

Tolerance: the moments agree bit for bit in float32; parameters may differ in the
last bits because torch's CPU sqrt (MKL VML) is not correctly rounded and ours is
(docs/adamw.md), so parameters are compared at rtol=atol=1e-6."""

from __future__ import annotations

import warnings

import pytest
import torch

from noam_ext import FusedAdamW

KW = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.1)


class Twin:
    """The same parameters under both optimizers; act() runs a function on each side."""

    def __init__(self, shapes, seed=0, build=None, **kwargs):
        generator = torch.Generator().manual_seed(seed)
        base = [torch.randn(s, generator=generator) for s in shapes]
        self.ours = [torch.nn.Parameter(t.clone()) for t in base]
        self.ref = [torch.nn.Parameter(t.clone()) for t in base]
        build = build or (lambda params: params)
        self.opt = FusedAdamW(build(self.ours), **{**KW, **kwargs})
        self.torch_opt = torch.optim.AdamW(build(self.ref), foreach=False, **{**KW, **kwargs})
        self.generator = torch.Generator().manual_seed(seed + 1)

    def sides(self):
        return ((self.ours, self.opt), (self.ref, self.torch_opt))

    def act(self, fn):
        for params, opt in self.sides():
            fn(params, opt)

    def random(self, shape):
        return torch.randn(shape, generator=self.generator)

    def step(self):
        self.opt.step()
        self.torch_opt.step()

    def assert_same(self):
        for a, b in zip(self.ours, self.ref):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-6)
        assert len(self.opt.state) == len(self.torch_opt.state)
        for a, b in zip(self.ours, self.ref):
            ours, theirs = self.opt.state.get(a, {}), self.torch_opt.state.get(b, {})
            assert set(ours) == set(theirs)
            for key, value in theirs.items():
                torch.testing.assert_close(ours[key].cpu().to(value.dtype), value, rtol=1e-6, atol=1e-6,
                                           msg=f"state[{key}]")


def set_grads(twin, grads):
    twin.act(lambda params, opt: [setattr(p, "grad", g.clone()) for p, g in zip(params, grads)])


# ---- 1. gradients written in place after zero_grad() --------------------------------------

def test_1_gradient_written_in_place_after_zero_grad():
    twin = Twin([(4, 3), (5,)])
    for step in range(5):
        grads = [twin.random(p.shape) for p in twin.ours]

        def write(params, opt):
            opt.zero_grad()
            for p, g in zip(params, grads):
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
        twin.act(write)
        twin.step()
    twin.assert_same()


def test_1_data_parallel_zeros_then_add_for_an_unused_parameter():
    twin = Twin([(6,), (3,)])
    for step in range(4):
        remote = twin.random((3,))

        def reduce(params, opt):
            opt.zero_grad()
            params[0].grad = torch.ones(6)          # used locally
            params[1].grad = torch.zeros(3)         # unused here: zeros, then the remote gradient
            params[1].grad.add_(remote)
        twin.act(reduce)
        twin.step()
    twin.assert_same()


# ---- 2. zero_grad(set_to_none=False) after a step without a gradient ----------------------

def test_2_parameter_without_gradient_stays_skipped_after_zero_grad_set_to_none_false():
    twin = Twin([(4,), (2,)])
    for step in range(4):
        g = twin.random((4,))

        def loop(params, opt):
            opt.zero_grad(set_to_none=False)
            params[0].grad = g.clone()   # params[1] never gets a gradient: .grad stays None
        twin.act(loop)
        twin.step()
    assert twin.ours[1].grad is None
    assert twin.ours[1] not in twin.opt.state
    twin.assert_same()


# ---- 3. 0-element parameters -----------------------------------------------------------

def test_3_zero_element_parameter_gets_state_like_torch():
    twin = Twin([(0,), (3,), (2, 0)])
    for _ in range(3):
        set_grads(twin, [torch.zeros(0), twin.random((3,)), torch.zeros(2, 0)])
        twin.step()
    assert float(twin.opt.state[twin.ours[0]]["step"]) == 3.0
    assert twin.opt.state[twin.ours[2]]["exp_avg"].shape == (2, 0)
    twin.assert_same()


# ---- 4. p.grad.data = t ------------------------------------------------------------------

def test_4_grad_data_replaced_is_read():
    twin = Twin([(5,)])
    set_grads(twin, [twin.random((5,))])
    twin.step()
    g = twin.random((5,))
    twin.act(lambda params, opt: setattr(params[0].grad, "data", g.clone()))
    twin.step()
    twin.assert_same()


def test_4_grad_data_of_the_wrong_shape_is_an_error_naming_the_parameter():
    twin = Twin([(5,), (3,)])
    set_grads(twin, [twin.random((5,)), twin.random((3,))])
    twin.step()
    twin.act(lambda params, opt: setattr(params[1].grad, "data", torch.ones(7)))
    before = [p.detach().clone() for p in twin.ours]
    with pytest.raises(RuntimeError, match=r"parameter 1 of param group 0 \(shape \(3,\)\) has shape \[7\]"):
        twin.opt.step()
    with pytest.raises(RuntimeError):
        twin.torch_opt.step()
    # Ours checks everything first: nothing changed (torch had updated parameter 0).
    assert all(torch.equal(p.detach(), b) for p, b in zip(twin.ours, before))


# ---- 5. optimizer.state is the truth -------------------------------------------------------

def test_5_state_clear_recreates_state_lazily_like_torch():
    twin = Twin([(4,), (3,)])
    for step in range(6):
        if step == 3:
            twin.act(lambda params, opt: opt.state.clear())
        set_grads(twin, [twin.random((4,)), twin.random((3,))])
        twin.step()
    assert float(twin.opt.state[twin.ours[0]]["step"]) == 3.0
    twin.assert_same()
    assert twin.opt.state_dict()["state"][0]["exp_avg"].abs().sum() > 0


def test_5_replaced_state_tensors_are_used():
    twin = Twin([(4,), (3,)])
    set_grads(twin, [twin.random((4,)), twin.random((3,))])
    twin.step()
    exp_avg, step = twin.random((4,)), torch.tensor(7.0)
    twin.act(lambda params, opt: opt.state[params[0]].update(exp_avg=exp_avg.clone(), step=step.clone()))
    set_grads(twin, [twin.random((4,)), twin.random((3,))])
    twin.step()
    twin.assert_same()
    assert float(twin.opt.state[twin.ours[0]]["step"]) == 8.0


def test_5_loaded_state_is_used_as_loaded():
    twin = Twin([(4,)])
    set_grads(twin, [twin.random((4,))])
    twin.step()
    saved = twin.torch_opt.state_dict()
    fresh = FusedAdamW([twin.ours[0]], **KW)
    fresh.load_state_dict(saved)
    assert fresh.state[twin.ours[0]]["exp_avg"] is twin.torch_opt.state[twin.ref[0]]["exp_avg"]


def test_5_non_parameter_keys_in_state_are_ignored():
    twin = Twin([(4,)])
    twin.act(lambda params, opt: opt.state.__setitem__("added_by_a_hook", True))
    for _ in range(2):
        set_grads(twin, [twin.random((4,))])
        twin.step()
    assert twin.opt.state["added_by_a_hook"] is True
    for a, b in zip(twin.ours, twin.ref):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-6)


# ---- 6. param_groups edits take effect ------------------------------------------------------

def test_6_appended_and_removed_parameters():
    twin = Twin([(4,), (3,), (2,)], build=lambda ps: [{"params": ps[:2]}])
    for step in range(6):
        if step == 2:
            twin.act(lambda params, opt: opt.param_groups[0]["params"].append(params[2]))
        if step == 4:
            twin.act(lambda params, opt: opt.param_groups[0]["params"].remove(params[0]))
        set_grads(twin, [twin.random((4,)), twin.random((3,)), twin.random((2,))])
        twin.step()
    twin.assert_same()
    assert float(twin.opt.state[twin.ours[0]]["step"]) == 4.0
    assert float(twin.opt.state[twin.ours[2]]["step"]) == 4.0


def test_6_hyperparameter_edits_and_add_param_group():
    twin = Twin([(4,), (3,)], build=lambda ps: [{"params": ps[:1]}])
    for step in range(5):
        if step == 1:
            twin.act(lambda params, opt: opt.add_param_group({"params": [params[1]], "weight_decay": 0.0}))
        if step == 3:
            twin.act(lambda params, opt: opt.param_groups[0].update(lr=3e-2, betas=(0.8, 0.9)))
        set_grads(twin, [twin.random((4,)), twin.random((3,))])
        twin.step()
    twin.assert_same()


# ---- 7. parameters sharing storage ------------------------------------------------------

def test_7_weights_tied_through_data_stay_shared():
    twin = Twin([(4, 3), (4, 3)])
    twin.act(lambda params, opt: setattr(params[1], "data", params[0].data))
    for _ in range(4):
        set_grads(twin, [twin.random((4, 3)), twin.random((4, 3))])
        twin.step()
    assert twin.ours[0].data_ptr() == twin.ours[1].data_ptr()
    twin.assert_same()


def test_7_overlapping_views_are_updated_in_order():
    # Two parameters that are overlapping views of one storage (rows 0-2 and 1-3).
    def build(params):
        storage = params[0].data
        params[1].data = storage[1:]
        params[0].data = storage[:3]
        return params
    twin = Twin([(4, 2), (3, 2)], build=build)
    for _ in range(3):
        set_grads(twin, [twin.random((3, 2)), twin.random((3, 2))])
        twin.step()
    twin.assert_same()


# ---- 9. the same parameter twice in a group ---------------------------------------------

def test_9_duplicate_parameter_is_stepped_twice_like_torch():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch warns about duplicates; both keep working
        twin = Twin([(5,)], build=lambda ps: [ps[0], ps[0]])
    for _ in range(3):
        set_grads(twin, [twin.random((5,))])
        twin.step()
    assert float(twin.opt.state[twin.ours[0]]["step"]) == 6.0
    twin.assert_same()


# ---- 11. sparse gradients ------------------------------------------------------------------

def test_11_sparse_gradient_is_a_clear_error_and_changes_nothing():
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    dense = torch.nn.Parameter(torch.randn(4))
    opt = FusedAdamW([dense, *embedding.parameters()], **KW)
    dense.grad = torch.ones(4)
    embedding(torch.tensor([1, 2])).sum().backward()
    before = [p.detach().clone() for p in (dense, embedding.weight)]
    with pytest.raises(RuntimeError, match=r"does not support sparse gradients \(parameter 1 of param group 0"):
        opt.step()
    assert torch.equal(dense.detach(), before[0]) and torch.equal(embedding.weight.detach(), before[1])
    assert len(opt.state) == 0
    ref = torch.optim.AdamW([embedding.weight], foreach=False)
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        ref.step()


# ---- autograd sees the step as torch's in-place update ---------------------------------------

def test_backward_through_values_the_step_overwrote_is_refused_like_torch():
    for make in (lambda ps: FusedAdamW(ps, **KW), lambda ps: torch.optim.AdamW(ps, foreach=False, **KW)):
        w = torch.nn.Parameter(torch.randn(3))
        opt = make([w])
        loss = (w * w).sum()         # saves w for backward
        w.grad = torch.ones(3)
        opt.step()                   # overwrites w in place
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_state_has_torchs_format_and_step_device():
    twin = Twin([(3, 2)], amsgrad=True)
    set_grads(twin, [twin.random((3, 2))])
    twin.step()
    ours = twin.opt.state[twin.ours[0]]
    theirs = twin.torch_opt.state[twin.ref[0]]
    assert list(ours) == list(theirs) == ["step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    assert ours["step"].dtype == torch.float32 and ours["step"].shape == ()
    assert ours["exp_avg"].shape == (3, 2)
    twin.assert_same()


# ---- complex parameters, as torch.optim.AdamW updates them (view_as_real) -----------------

@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=["complex64", "complex128"])
def test_complex_parameters_match_torch(dtype):
    generator = torch.Generator().manual_seed(0)
    base = [torch.randn(4, 3, dtype=dtype, generator=generator), torch.randn(5, dtype=dtype, generator=generator)]
    ours = [torch.nn.Parameter(t.clone()) for t in base] + [torch.nn.Parameter(torch.randn(3))]
    theirs = [torch.nn.Parameter(t.detach().clone()) for t in ours]
    opt = FusedAdamW(ours, amsgrad=True, **KW)
    ref = torch.optim.AdamW(theirs, amsgrad=True, foreach=False, **KW)
    for _ in range(5):
        grads = [torch.randn(p.shape, dtype=p.dtype, generator=generator) for p in ours]
        for params in (ours, theirs):
            for p, g in zip(params, grads):
                p.grad = g.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert opt.state[a][key].dtype == ref.state[b][key].dtype
            torch.testing.assert_close(opt.state[a][key], ref.state[b][key], rtol=1e-6, atol=1e-7)


# ---- one parameter's state is its own (saved, copied and freed alone, as torch's) --------

def _trained_mlp_pair():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)])
    twin_model = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    ours = FusedAdamW(model.parameters(), **KW)
    theirs = torch.optim.AdamW(twin_model, foreach=False, **KW)
    for params, opt in ((list(model.parameters()), ours), (twin_model, theirs)):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    return ours, theirs


def test_saving_one_parameters_state_writes_what_torch_writes(tmp_path):
    import io

    ours, theirs = _trained_mlp_pair()
    sizes = []
    for opt in (ours, theirs):
        buffer = io.BytesIO()
        torch.save(opt.state_dict()["state"][0], buffer)
        sizes.append(len(buffer.getvalue()))
    # Parameter 0 is a 64 x 64 weight: two float32 moments of 16 KiB each plus pickling overhead.
    assert sizes[0] == sizes[1]
    assert sizes[0] < 3 * 64 * 64 * 4


def test_copying_one_parameters_state_copies_only_its_moments():
    import copy

    ours, theirs = _trained_mlp_pair()
    for opt in (ours, theirs):
        p = opt.param_groups[0]["params"][0]
        state = opt.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            # Its own storage, exactly its own size: nothing else rides along.
            assert state[key].untyped_storage().nbytes() == p.numel() * p.element_size()
        copied = copy.deepcopy(state)
        assert sum(t.untyped_storage().nbytes() for t in copied.values()) == \
            sum(t.untyped_storage().nbytes() for t in state.values())


def test_dropping_a_parameters_state_frees_its_memory():
    import weakref

    ours, _ = _trained_mlp_pair()
    p = ours.param_groups[0]["params"][0]
    storage = ours.state[p]["exp_avg"].untyped_storage()
    # No other parameter's state holds this storage: once the state entry goes, it is freed.
    others = [s[k].untyped_storage().data_ptr() for q, s in ours.state.items() if q is not p for k in ("exp_avg", "exp_avg_sq")]
    assert storage.data_ptr() not in others
    ref = weakref.ref(ours.state[p]["exp_avg"])
    del storage
    del ours.state[p]
    assert ref() is None


def test_step_hooks_run_as_torchs_around_each_step():
    """register_step_pre_hook / register_step_post_hook and the global hooks see each
    step as torch's do (FusedAdamW skips torch's step wrapper only when none is set),
    and a pre-hook's replacement arguments reach step()."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    twin = Twin([(3, 4), (5,)])
    set_grads(twin, [twin.random(p.shape) for p in twin.ours])
    logs = {}
    handles = []
    for params, opt in twin.sides():
        log = logs[type(opt).__name__] = []
        handles.append(opt.register_step_pre_hook(lambda o, args, kwargs, log=log: log.append(("pre", len(args)))))
        handles.append(opt.register_step_post_hook(lambda o, args, kwargs, log=log: log.append(("post", len(args)))))
    seen = []
    handles.append(register_optimizer_step_pre_hook(lambda o, args, kwargs: seen.append(type(o).__name__)))
    handles.append(register_optimizer_step_post_hook(lambda o, args, kwargs: seen.append(type(o).__name__)))
    try:
        twin.step()
    finally:
        for handle in handles:
            handle.remove()
    assert logs["FusedAdamW"] == logs["AdamW"] == [("pre", 1), ("post", 1)]
    assert seen == ["FusedAdamW", "FusedAdamW", "AdamW", "AdamW"]
    twin.assert_same()

    # A pre-hook may replace step()'s arguments: here it hands step() a closure.
    calls = []
    handle = twin.opt.register_step_pre_hook(lambda o, args, kwargs: (args, {"closure": lambda: calls.append(1)}))
    try:
        twin.opt.step()
    finally:
        handle.remove()
    assert calls == [1]
    twin.opt.step()   # no hook left: step() itself, straight
    assert calls == [1]


def test_profiler_sees_the_step_as_torchs():
    """Under torch.profiler a step shows as "Optimizer.step#FusedAdamW.step", the range
    torch's wrapper records (and FusedAdamW skips when no profiler runs)."""
    twin = Twin([(3, 4)])
    set_grads(twin, [twin.random(p.shape) for p in twin.ours])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        twin.step()
    names = [event.name for event in prof.events()]
    assert names.count("Optimizer.step#FusedAdamW.step") == 1
    assert names.count("Optimizer.step#AdamW.step") == 1
    twin.assert_same()

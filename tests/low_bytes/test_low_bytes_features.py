"""Every other feature of FusedAdamW, with each low-byte option (issue 17, "Everything
else keeps working"): torch.amp.GradScaler, clip_grad_norm_, torch.compile(fullgraph=True),
state_dict through torch.save / torch.load(weights_only=True), a torch.optim.AdamW
checkpoint loaded into each option, and bad masters refused before anything changes.
Every run here has two param groups (amsgrad and maximize in the second); the schedule
runs inside the op where a test can keep it in step. The options' own numerics are in
test_low_bytes.py; DDP and FSDP2 in test_distributed.py (scenario "low_bytes").

The options (OPTIONS): bfloat16 parameters with a float32 master, with an int16
remainder, with a remainder and bfloat16 moments; float32 parameters with bfloat16
moments; bfloat16 parameters (and moments) rounded stochastically; float32 parameters
with bfloat16 gradients.

Every comparison is bit for bit (tolerance 0), because each compares the same math on
the same values:
- GradScaler: the scales are powers of two, so a scaled gradient (in bfloat16 or float32)
  is exact and the op's unscaling gives back the gradient exactly: the scaled run equals
  the unscaled one. A step with an inf or NaN gradient changes nothing, masters included,
  and does not advance the step (so stochastic rounding's keys stay in step too).
- clip_grad_norm_: a master form computes what FusedAdamW computes on float32 copies of
  the parameters (test_low_bytes.py), so given the same bfloat16 gradients (hence the same
  norm and clipping factor) its clipped step is the clipped float32 run. For every option,
  a clipping factor of exactly 0.25 (inf-norm 64, max_norm 16: exact in every dtype) gives
  the step of the gradients times 0.25.
- torch.compile: the compiled step calls the same op with the same arguments.
- Checkpoints: the state keeps its dtypes through torch.save/torch.load, so a resumed run
  is the straight run; a torch.optim.AdamW checkpoint's moments are converted to the
  option's dtype (torch.Tensor.to) and the masters made from the parameters, and for the
  master forms the result is also the float32 run loaded from the same checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import torch._dynamo.testing

from noam_ext import FusedAdamW, WarmupCosine
from noam_ext._storage import master_of

from mixed_grads import assign_grad

BF16, F32 = torch.bfloat16, torch.float32
KW = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1)
SIZES = [(3, 5), (257,), (4100,), (1,), (6, 7)]   # tails, a vector body, a single element


@dataclass
class Option:
    param_dtype: torch.dtype
    grad_dtype: torch.dtype
    kwargs: dict = field(default_factory=dict)

    @property
    def master(self) -> str | None:
        return self.kwargs.get("master_weights")

    @property
    def moment_dtype(self) -> torch.dtype:
        default = F32 if self.master is not None else self.param_dtype
        return self.kwargs.get("moment_dtype") or default


OPTIONS = {
    "master-float32": Option(BF16, BF16, dict(master_weights="float32")),
    "remainder": Option(BF16, BF16, dict(master_weights="remainder")),
    "remainder-bf16-moments": Option(BF16, BF16, dict(master_weights="remainder", moment_dtype=BF16)),
    "fp32-params-bf16-moments": Option(F32, F32, dict(moment_dtype=BF16)),
    "stochastic-rounding": Option(BF16, BF16, dict(stochastic_rounding=True, seed=1234)),
    "fp32-params-bf16-grads": Option(F32, BF16),
}
MASTER_FORMS = ["master-float32", "remainder", "remainder-bf16-moments"]
MASTER_KEYS = {"float32": "master_param", "remainder": "master_remainder"}


def base_values(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=generator) for s in SIZES]


def groups(params):
    return [{"params": params[:2]},
            {"params": params[2:], "amsgrad": True, "maximize": True, "lr": 3e-3, "weight_decay": 0.0}]


def make(option: Option, values, schedule=None, **overrides):
    params = [torch.nn.Parameter(v.to(option.param_dtype, copy=True)) for v in values]
    kwargs = {**option.kwargs, **overrides}
    return params, FusedAdamW(groups(params), **KW, **kwargs, schedule=schedule)


def gradients(option: Option, step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=generator).to(option.grad_dtype) for s in SIZES]



def set_grads(params, grads) -> None:
    for p, g in zip(params, grads):
        assign_grad(p, g.clone())


def snapshot(params, opt) -> dict:
    """Every parameter and every state tensor (masters included), copied."""
    out = {}
    for i, p in enumerate(params):
        out[("param", i)] = p.detach().clone()
        for key, value in sorted(opt.state.get(p, {}).items()):
            out[("state", i, key)] = value.clone()
    return out


def assert_same_bits(actual: dict, expected: dict, what: str = "") -> None:
    assert actual.keys() == expected.keys(), what
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, (what, key, actual[key].dtype, value.dtype)
        assert torch.equal(actual[key], value), (what, key)


def master_value(option: Option, p, state) -> torch.Tensor:
    if option.master == "float32":
        return state["master_param"]
    return master_of(p.detach(), state["master_remainder"])


def rounded_away(master: torch.Tensor) -> torch.Tensor:
    """The bfloat16 nearest to each float32, ties away from zero (what a master form writes)."""
    bits = master.view(torch.int32)
    return ((bits + 0x8000) & -0x10000).view(torch.float32).to(torch.bfloat16)


def float32_twin(option: Option, params):
    """FusedAdamW on float32 copies of the parameters, with the option's moment dtype: what
    a master form computes, bit for bit (test_low_bytes.py)."""
    twins = [torch.nn.Parameter(p.detach().float()) for p in params]
    moment = option.kwargs.get("moment_dtype")
    return twins, FusedAdamW(groups(twins), **KW, **({"moment_dtype": moment} if moment else {}))


def assert_master_form_is_the_float32_run(option: Option, params, opt, twins, twin_opt, what: str) -> None:
    for i, (p, q) in enumerate(zip(params, twins)):
        master = master_value(option, p, opt.state[p])
        assert torch.equal(master, q.detach()), (what, i)
        assert torch.equal(p.detach(), rounded_away(master)), (what, i)
        for key, value in twin_opt.state[q].items():
            if key != "step":
                assert opt.state[p][key].dtype == option.moment_dtype, (what, i, key)
                assert torch.equal(opt.state[p][key], value), (what, i, key)


names = pytest.mark.parametrize("name", list(OPTIONS))


# ---- GradScaler ----------------------------------------------------------------------------

@names
def test_grad_scaler_unscales_exactly_and_an_inf_step_changes_nothing(name):
    option = OPTIONS[name]
    values = base_values()
    # No schedule here: it advances on a skipped step too (as torch's LambdaLR steps every
    # iteration), so the unscaled twin, which takes no step there, would fall out of step.
    scaled, opt = make(option, values)
    plain, ref = make(option, values)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=1)
    scaler.scale(torch.ones(()))   # creates the scale, as the first scaler.scale(loss) does
    scales, bad_steps = set(), {3: float("inf"), 6: float("nan")}
    for step in range(10):
        grads = gradients(option, step)
        scale = scaler.get_scale()
        scales.add(scale)
        scaled_grads = [g * scale for g in grads]   # exact: a power of two
        if step in bad_steps:
            scaled_grads[2].view(-1)[7] = bad_steps[step]   # an overflowed step, in the second group
        set_grads(scaled, scaled_grads)
        before = snapshot(scaled, opt)
        scaler.step(opt)
        scaler.update()
        if step in bad_steps:
            assert_same_bits(snapshot(scaled, opt), before, f"{name}: skipped step {step}")
            assert scaler.get_scale() == scale / 2
            continue
        set_grads(plain, grads)
        ref.step()
        assert_same_bits(snapshot(scaled, opt), snapshot(plain, ref), f"{name}: step {step}")
    assert len(scales) >= 3   # the scale grew and shrank: several scales were undone
    assert {float(opt.state[p]["step"]) for p in scaled} == {8.0}


# ---- clip_grad_norm_ -----------------------------------------------------------------------

@pytest.mark.parametrize("norm_type", [2.0, float("inf")], ids=["l2", "inf"])
@pytest.mark.parametrize("name", MASTER_FORMS)
def test_clipped_step_of_a_master_form_is_the_clipped_float32_run(name, norm_type):
    option = OPTIONS[name]
    params, opt = make(option, base_values())
    twins, twin_opt = float32_twin(option, params)
    for step in range(6):
        grads = [3 * g for g in gradients(option, step)]
        set_grads(params, grads)
        set_grads(twins, grads)   # bfloat16 gradients of the float32 copies: the same norm
        norm = opt.clip_grad_norm_(1.0, norm_type)
        twin_norm = twin_opt.clip_grad_norm_(1.0, norm_type)
        assert torch.equal(norm, twin_norm)
        assert float(norm) > 2.0   # the clipping acts
        opt.step()
        twin_opt.step()
        assert_master_form_is_the_float32_run(option, params, opt, twins, twin_opt, f"{name}: step {step}")


@names
def test_clipped_step_is_the_step_of_the_clipped_gradients(name):
    option = OPTIONS[name]
    values = base_values()
    clipped, opt = make(option, values)
    twins, ref = make(option, values)
    for step in range(5):
        grads = gradients(option, step)
        grads[1].view(-1)[step] = 64.0 if step % 2 else -64.0   # the inf-norm: 64, exactly
        set_grads(clipped, grads)
        norm = opt.clip_grad_norm_(16.0, float("inf"))   # factor 16 / 64 = 0.25, exact in every dtype
        assert float(norm) == 64.0
        set_grads(twins, [g * 0.25 for g in grads])
        opt.step()
        ref.step()
        assert_same_bits(snapshot(clipped, opt), snapshot(twins, ref), f"{name}: step {step}")


# ---- torch.compile ---------------------------------------------------------------------------

def _fake_tensors_keep_grad_dtype() -> bool:
    """Whether torch.compile can take a parameter whose gradient has another dtype (p.grad_dtype):
    torch 2.14's fake-tensor conversion (torch/_subclasses/meta_utils.py, MetaConverter.meta_tensor)
    assigns the fake gradient without the parameter's grad_dtype and raises."""
    if not hasattr(torch.Tensor, "grad_dtype"):
        return True   # older torch: the gradient is set through .data, nothing is checked
    from torch._subclasses.fake_tensor import FakeTensorMode
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad_dtype = BF16
    p.grad = torch.zeros(2, dtype=BF16)
    try:
        FakeTensorMode().from_tensor(p)
    except RuntimeError:
        return False
    return True


COMPILE_CASES = [
    pytest.param(name, marks=pytest.mark.xfail(
        not _fake_tensors_keep_grad_dtype(), strict=True, raises=torch._dynamo.exc.InternalTorchDynamoError,
        reason="torch, not noam_ext: Dynamo's fake copy of a float32 parameter gets its bfloat16 gradient "
               "without p.grad_dtype (torch/_subclasses/meta_utils.py, MetaConverter.meta_tensor: "
               "'attempting to assign a gradient with dtype BFloat16 to a tensor with grad_dtype Float'), "
               "so a step reading it cannot be traced; the eager step takes it"))
    if name == "fp32-params-bf16-grads" else name
    for name in OPTIONS]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", COMPILE_CASES)
def test_compiled_step_gives_the_eager_bits_and_does_not_recompile(name, fresh_dynamo):
    option = OPTIONS[name]
    values = base_values()
    schedule = WarmupCosine(warmup_steps=2, total_steps=10)   # the lr changes at every step
    eager_params, eager = make(option, values, schedule=schedule)
    compiled_params, compiled = make(option, values, schedule=schedule)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    step = torch.compile(compiled.step, fullgraph=True, backend=counter)   # fails on any graph break
    compiles_after_warm_up = None
    for k in range(1, 7):
        grads = gradients(option, k)
        set_grads(eager_params, grads)
        set_grads(compiled_params, grads)
        eager.step()
        step()
        assert_same_bits(snapshot(compiled_params, compiled), snapshot(eager_params, eager), f"{name}: step {k}")
        if k == 2:   # the first step creates the state (masters too), the second sees it
            compiles_after_warm_up = counter.frame_count
    assert 1 <= compiles_after_warm_up <= 2 and counter.frame_count == compiles_after_warm_up


# ---- checkpoints -----------------------------------------------------------------------------

def train(params, opt, option: Option, steps) -> None:
    for step in steps:
        set_grads(params, gradients(option, step))
        opt.step()


@names
def test_state_dict_through_torch_save_and_weights_only_load_resumes_bit_for_bit(name, tmp_path):
    option = OPTIONS[name]
    values = base_values()
    schedule = WarmupCosine(warmup_steps=2, total_steps=10)
    straight_params, straight = make(option, values, schedule=schedule)
    train(straight_params, straight, option, range(6))
    first_params, first = make(option, values, schedule=schedule)
    train(first_params, first, option, range(3))
    torch.save(first.state_dict(), tmp_path / "optimizer.pt")
    saved = torch.load(tmp_path / "optimizer.pt", weights_only=True)
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in first_params]
    # Built with another seed: the checkpoint's replaces it.
    other_seed = {"seed": 99} if option.kwargs.get("stochastic_rounding") else {}
    resumed = FusedAdamW(groups(resumed_params), **KW, **{**option.kwargs, **other_seed}, schedule=schedule)
    resumed.load_state_dict(saved)
    assert_same_bits(snapshot(resumed_params, resumed), snapshot(first_params, first), f"{name}: loaded")
    for group, saved_group in zip(resumed.param_groups, first.param_groups):
        for key in ("master_weights", "moment_dtype", "stochastic_rounding", "seed"):
            assert group.get(key) == saved_group.get(key), (name, key)
    train(resumed_params, resumed, option, range(3, 6))
    assert_same_bits(snapshot(resumed_params, resumed), snapshot(straight_params, straight), f"{name}: resumed")


def converted_torch_state(option: Option, p: torch.Tensor, torch_state: dict) -> dict:
    """What a torch.optim.AdamW state becomes under the option: moments converted to the
    option's dtype, the step as it is, and the master made from the parameter."""
    state = {key: value.clone() if key == "step" else value.to(option.moment_dtype)
             for key, value in torch_state.items()}
    if option.master == "float32":
        state["master_param"] = p.detach().float()
    elif option.master == "remainder":
        state["master_remainder"] = torch.zeros_like(p, dtype=torch.int16)
    return state


@names
def test_a_torch_adamw_checkpoint_loads_into_each_option(name, tmp_path):
    option = OPTIONS[name]
    theirs = [torch.nn.Parameter(v.to(option.param_dtype, copy=True)) for v in base_values()]
    torch_opt = torch.optim.AdamW(groups(theirs), **KW, foreach=False)
    for step in range(3):
        for p, g in zip(theirs, gradients(option, step)):
            p.grad = g.to(p.dtype)   # torch takes gradients of the parameter's dtype only
        torch_opt.step()
    torch.save(torch_opt.state_dict(), tmp_path / "torch_adamw.pt")

    def saved():   # a copy per optimizer: load_state_dict keeps (shares) tensors of the right dtype, as torch's
        return torch.load(tmp_path / "torch_adamw.pt", weights_only=True)

    ours = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    opt = FusedAdamW(groups(ours), **KW, **option.kwargs)
    opt.load_state_dict(saved())
    for p, q in zip(ours, theirs):
        for key, value in torch_opt.state[q].items():
            if key != "step":
                assert opt.state[p][key].dtype == option.moment_dtype, (name, key)
                assert torch.equal(opt.state[p][key], value.to(option.moment_dtype)), (name, key)
        assert float(opt.state[p]["step"]) == 3.0
    if option.kwargs.get("stochastic_rounding"):
        assert all(g["seed"] == option.kwargs["seed"] for g in opt.param_groups)   # torch's has none: ours stays

    # The same optimizer with that state written by hand.
    by_hand = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    ref = FusedAdamW(groups(by_hand), **KW, **option.kwargs)
    for p, q in zip(by_hand, theirs):
        ref.state[p] = converted_torch_state(option, p, torch_opt.state[q])
    if option.master is not None:
        twins, twin_opt = float32_twin(option, theirs)
        twin_opt.load_state_dict(saved())
    for step in range(3, 6):
        grads = gradients(option, step)
        for params, o in ((ours, opt), (by_hand, ref)) + (((twins, twin_opt),) if option.master else ()):
            set_grads(params, grads)
            o.step()
        assert_same_bits(snapshot(ours, opt), snapshot(by_hand, ref), f"{name}: step {step}")
        if option.master is not None:
            assert_master_form_is_the_float32_run(option, ours, opt, twins, twin_opt, f"{name}: step {step}")



@names
def test_each_options_checkpoint_loads_into_torch_adamw(name, tmp_path):
    # torch casts the moments to the parameters' dtype and ignores masters and option keys;
    # the step it then takes is its own.
    option = OPTIONS[name]
    params, opt = make(option, base_values())
    train(params, opt, option, range(3))
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in params]
    torch_opt = torch.optim.AdamW(groups(theirs), **KW, foreach=False)
    torch_opt.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    for p, q in zip(params, theirs):
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if "max_exp_avg_sq" in opt.state[p] else ()):
            assert torch.equal(torch_opt.state[q][key], opt.state[p][key].to(option.param_dtype)), (name, key)
        assert float(torch_opt.state[q]["step"]) == 3.0
    for p, g in zip(theirs, gradients(option, 3)):
        p.grad = g.to(p.dtype)
    torch_opt.step()
    assert all(float(torch_opt.state[q]["step"]) == 4.0 for q in theirs)

# ---- bad masters: refused first -----------------------------------------------------------------

def _transposed(p, dtype):
    return torch.zeros(p.shape[::-1], dtype=dtype)


def _flat(p, dtype):
    return torch.zeros(p.numel(), dtype=dtype)


def _reshaped(dtype):
    return lambda p: torch.zeros(p.shape, dtype=dtype)


# (master form, bad value made from the parameter); the parameter is (6, 7)-shaped.
BAD_MASTERS = {
    "float32-transposed": ("float32", lambda p: _transposed(p, F32)),
    "float32-flat": ("float32", lambda p: _flat(p, F32)),
    "remainder-transposed": ("remainder", lambda p: _transposed(p, torch.int16)),
    "float32-as-float16": ("float32", _reshaped(torch.float16)),
    "remainder-as-bfloat16": ("remainder", _reshaped(BF16)),
    "float32-as-int16": ("float32", _reshaped(torch.int16)),
    "remainder-as-float32": ("remainder", _reshaped(F32)),
}
XFAIL_STATE: dict[str, str] = {}


def _bad_master_cases(xfails: dict):
    return [pytest.param(case, marks=pytest.mark.xfail(strict=True, reason=xfails[case])) if case in xfails
            else case for case in BAD_MASTERS]


def _trained(form: str):
    params, opt = make(Option(BF16, BF16, dict(master_weights=form)), base_values())
    train(params, opt, OPTIONS["master-float32"], range(2))
    return params, opt


@pytest.mark.parametrize("case", _bad_master_cases(XFAIL_STATE))
def test_a_bad_master_in_the_state_is_an_error_naming_the_parameter_and_changes_nothing(case):
    form, bad = BAD_MASTERS[case]
    params, opt = _trained(form)
    opt.state[params[4]][MASTER_KEYS[form]] = bad(params[4])   # parameter 2 of param group 1
    set_grads(params, gradients(OPTIONS["master-float32"], 2))
    before = snapshot(params, opt)
    with pytest.raises((RuntimeError, ValueError), match=r"parameter 2 of param group 1 \(shape \(6, 7\)\)"):
        opt.step()
    assert_same_bits(snapshot(params, opt), before, case)


@pytest.mark.parametrize("case", list(BAD_MASTERS))
def test_a_checkpoint_with_a_bad_master_is_refused_naming_the_parameter_and_changes_nothing(case):
    form, bad = BAD_MASTERS[case]
    params, opt = _trained(form)
    saved = opt.state_dict()
    saved["state"][4] = {**saved["state"][4], MASTER_KEYS[form]: bad(params[4])}
    others, other = _trained(form)
    before = snapshot(others, other)
    with pytest.raises(ValueError, match=r"parameter 2 of param group 1 \(shape \(6, 7\)\)"):
        other.load_state_dict(saved)
    assert_same_bits(snapshot(others, other), before, case)
    assert other.param_groups[1]["params"] == others[2:]


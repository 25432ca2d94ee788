"""Parameters that are not dense in memory, and gradients or state with other strides
than their parameter: trained as torch.optim.AdamW trains them.

The op walks such a row through a strided layout (csrc/noam_ext/work_split.h); on the
CPU it gathers the row's elements tile by tile into contiguous buffers and updates
them with the same vectorised loop as every dense row, so the results are bit for bit
those of the same tensors made contiguous. Against torch the usual tolerance holds
(moments bitwise in float32; parameters within a few ulp, torch's CPU sqrt not being
correctly rounded: rtol=atol=1e-6)."""

from __future__ import annotations

import pytest
import torch

from noam_ext import FusedAdamW
from op_args import clone, make_args, positional

KW = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.1)


def call(args, **kwargs):
    torch.ops.noam_ext.fused_adamw_(*positional(args), **kwargs)


def gappy(t: torch.Tensor) -> torch.Tensor:
    """t's values in a view with gaps, as torch.randn(..., 2)[..., 0] makes one."""
    out = torch.empty(*t.shape, 3, dtype=t.dtype)[..., 1]
    out.copy_(t)
    return out


# ---- the op: strided rows give the bits of the same tensors made contiguous -------------------

STRIDED_CASES = [(amsgrad, which) for amsgrad in (False, True)
                 for which in ("params", "grads", "exp_avgs", "exp_avg_sqs", "all")
                 + (("max_exp_avg_sqs",) if amsgrad else ())]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["f32", "f64", "bf16", "f16"])
@pytest.mark.parametrize("amsgrad,which", STRIDED_CASES,
                         ids=[f"{'amsgrad' if a else 'adamw'}-{w}" for a, w in STRIDED_CASES])
def test_strided_rows_match_contiguous_bit_for_bit(dtype, amsgrad, which):
    # Sizes around the CPU tile (256) and the grain, several groups; every other tensor strided.
    numels = [1, 7, 255, 256, 257, 1000, 40000, 3]
    dense = make_args(numels, dtype=dtype, amsgrad=amsgrad, seed=3)
    strided = clone(dense)
    keys = ["params", "grads", "exp_avgs", "exp_avg_sqs"] + (["max_exp_avg_sqs"] if amsgrad else [])
    for key in keys if which == "all" else [which]:
        strided[key] = [gappy(t) if i % 2 else t for i, t in enumerate(strided[key])]
    call(dense)
    call(strided)
    for key in keys:
        for i, (a, b) in enumerate(zip(strided[key], dense[key])):
            assert torch.equal(a, b), f"{key}[{i}]"
    assert [float(s) for s in strided["state_steps"]] == [float(s) for s in dense["state_steps"]]


def test_multi_dimensional_strides_are_merged_and_walked_in_order():
    # A permuted 4-D parameter with a gap, gradient contiguous, state in a third layout.
    shape = (5, 3, 6, 4)
    a = make_args([5 * 3 * 6 * 4], seed=5)
    a["params"] = [torch.randn(3, 4, 5, 6, 2)[..., 0].permute(2, 0, 3, 1)]   # not dense
    a["params"][0].copy_(torch.randn(shape))
    a["grads"] = [torch.randn(shape)]
    a["exp_avgs"] = [torch.randn(6, 5, 4, 3).permute(1, 3, 0, 2)]
    a["exp_avg_sqs"] = [torch.rand(shape)]
    contiguous = clone(a)
    for key in ("params", "grads", "exp_avgs", "exp_avg_sqs"):
        contiguous[key] = [t.clone(memory_format=torch.contiguous_format) for t in a[key]]
    call(a)
    call(contiguous)
    for key in ("params", "exp_avgs", "exp_avg_sqs"):
        assert torch.equal(a[key][0], contiguous[key][0]), key


def test_a_parameter_whose_elements_share_memory_is_refused_and_nothing_changes():
    a = make_args([4, 6])
    a["params"][1] = torch.randn(1, 3).expand(2, 3)    # 6 elements over 3 addresses
    for key in ("grads", "exp_avgs", "exp_avg_sqs"):
        a[key][1] = a[key][1].view(2, 3)
    before = clone(a)
    with pytest.raises(RuntimeError, match=r"params\[1\] has elements that share memory"):
        call(a)
    for key in ("params", "exp_avgs", "exp_avg_sqs", "state_steps"):
        for x, y in zip(a[key], before[key]):
            assert torch.equal(x, y)
    assert torch.equal(a["schedule_step"], before["schedule_step"])


def test_an_expanded_gradient_is_read_like_any_other():
    a = make_args([6])
    a["params"] = [a["params"][0].view(2, 3)]
    a["exp_avgs"] = [a["exp_avgs"][0].view(2, 3)]
    a["exp_avg_sqs"] = [a["exp_avg_sqs"][0].view(2, 3)]
    row = torch.randn(1, 3)
    a["grads"] = [row.expand(2, 3)]
    dense = clone(a)
    dense["grads"] = [row.expand(2, 3).contiguous()]
    call(a)
    call(dense)
    assert torch.equal(a["params"][0], dense["params"][0])


# ---- FusedAdamW side by side with torch.optim.AdamW ------------------------------------------

def _twins(make, **kwargs):
    """make() twice from the same seed: the same values and strides on both sides."""
    torch.manual_seed(0)
    ours = make()
    torch.manual_seed(0)
    theirs = make()
    return ours, theirs, FusedAdamW(ours, **{**KW, **kwargs}), torch.optim.AdamW(theirs, foreach=False,
                                                                                   **{**KW, **kwargs})


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
def test_views_with_gaps_train_like_torch_with_torchs_state_layout(amsgrad):
    def make():
        return [torch.nn.Parameter(torch.randn(10, 5, 2)[..., 0]), torch.nn.Parameter(torch.randn(10, 2)[..., 0]),
                torch.nn.Parameter(torch.randn(4, 3))]

    ours, theirs, opt, ref = _twins(make, amsgrad=amsgrad)
    x = torch.randn(5)
    for _ in range(10):
        for params, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            ((params[0].mv(x) + params[1]).pow(2).sum() + params[2].sum()).backward()
            o.step()
    for p, q in zip(ours, theirs):
        assert p.stride() == q.stride()
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-6)
        # Gradients as autograd made them, state as zeros_like made it: torch's strides, torch's values.
        assert p.grad.stride() == q.grad.stride()
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
            assert opt.state[p][key].stride() == ref.state[q][key].stride(), key
            torch.testing.assert_close(opt.state[p][key], ref.state[q][key], rtol=1e-6, atol=1e-7)
        assert float(opt.state[p]["step"]) == float(ref.state[q]["step"]) == 10


def test_gradient_and_state_with_other_strides_than_the_parameter():
    ours, theirs, opt, ref = _twins(lambda: [torch.nn.Parameter(torch.randn(6, 4))])
    generator = torch.Generator().manual_seed(1)
    for step in range(6):
        g = torch.randn(4, 6, generator=generator).t()          # (6, 4) with strides (1, 6)
        ours[0].grad, theirs[0].grad = g.clone().t().contiguous().t(), g.clone()
        if step == 3:   # state replaced by transposed copies, as a user or a loader might
            for o, p in ((opt, ours[0]), (ref, theirs[0])):
                for key in ("exp_avg", "exp_avg_sq"):
                    o.state[p][key] = o.state[p][key].t().contiguous().t()
        opt.step()
        ref.step()
    torch.testing.assert_close(ours[0].detach(), theirs[0].detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(opt.state[ours[0]]["exp_avg"], ref.state[theirs[0]]["exp_avg"], rtol=0, atol=0)


def test_interleaved_views_of_one_buffer_are_separate_parameters_like_torchs():
    # x[..., 0] and x[..., 1] share a storage and an address range but no element.
    torch.manual_seed(0)
    buffer = torch.randn(8, 2)
    ours = [torch.nn.Parameter(buffer[:, 0]), torch.nn.Parameter(buffer[:, 1])]
    ref_buffer = buffer.clone()
    theirs = [torch.nn.Parameter(ref_buffer[:, 0]), torch.nn.Parameter(ref_buffer[:, 1])]
    opt, ref = FusedAdamW(ours, **KW), torch.optim.AdamW(theirs, foreach=False, **KW)
    for _ in range(4):
        for params, o in ((ours, opt), (theirs, ref)):
            for i, p in enumerate(params):
                p.grad = torch.full((8,), float(i + 1))
            o.step()
    torch.testing.assert_close(buffer, ref_buffer, rtol=1e-6, atol=1e-6)


# ---- PyTorch's own non-contiguous cases (test_optim.py, test_forloop_goes_right_direction) ----

# torch.testing._internal.common_optimizers.optim_inputs_func_adamw on the CPU, and the
# foreach settings its test crosses them with (fused and differentiable are skipped there).
TORCH_ADAMW_INPUTS = [
    ("default", {}),
    ("non-default lr", {"lr": 0.01}),
    ("nonzero weight_decay", {"weight_decay": 0.1}),
    ("maximize", {"weight_decay": 0.1, "maximize": True}),
    ("amsgrad", {"weight_decay": 0.1, "amsgrad": True}),
]


@pytest.mark.parametrize("with_lrsched", [False, True], ids=["no-sched", "lr-sched"])
@pytest.mark.parametrize("foreach", [None, False, True], ids=["foreach-default", "foreach-False", "foreach-True"])
@pytest.mark.parametrize("desc,kwargs", TORCH_ADAMW_INPUTS, ids=[d for d, _ in TORCH_ADAMW_INPUTS])
def test_torchs_forloop_goes_right_direction_on_non_contiguous_parameters(desc, kwargs, foreach, with_lrsched):
    """torch's test, on views with gaps, for FusedAdamW and torch.optim.AdamW side by side:
    the loss goes the right way, and both end at the same parameters."""
    kwargs = {**kwargs, "foreach": foreach}
    results = []
    for cls in (FusedAdamW, torch.optim.AdamW):
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn((10, 5, 2))[..., 0])
        bias = torch.nn.Parameter(torch.randn((10, 2))[..., 0])
        x = torch.randn(5)
        optimizer = cls([weight, bias], **kwargs)
        schedulers = ([torch.optim.lr_scheduler.StepLR(optimizer, gamma=0.9, step_size=10),
                       torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)] if with_lrsched else [])

        def closure():
            optimizer.zero_grad()
            loss = (weight.mv(x) + bias).pow(2).sum()
            loss.backward()
            return loss

        initial = closure().item()
        for _ in range(20):
            loss = closure()
            optimizer.step()
            for scheduler in schedulers:
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(loss.detach())
                else:
                    scheduler.step()
        final = closure().item()
        if kwargs.get("maximize", False):
            assert final > initial
        else:
            assert final < initial
        results.append([weight.detach().clone(), bias.detach().clone()])
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)

"""The eager step and the compiled step make the same op calls.

step() plans its calls in C++ (csrc/step/collect.h); under torch.compile, _traceable_calls
plans them in Python that Dynamo can follow. Both must give the same buckets, in the same
order of parameters, with the same hyperparameter rows, rounding streams and element offsets,
and the same hyperparameter table, for every option, param groups, mixed dtypes and devices."""

from __future__ import annotations

import pytest
import torch

from noam_ext import FusedAdamW, Noam, WarmupCosine
from noam_ext import _C
from noam_ext.optimizer import _traceable_calls

from mixed_grads import assign_grad

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def params(device, dtype, *shapes, complex_=False):
    torch.manual_seed(len(shapes))
    kind = torch.complex64 if complex_ else dtype
    return [torch.nn.Parameter(torch.randn(*shape, dtype=kind, device=device)) for shape in shapes]


def configurations(device):
    f32, bf16, f64 = torch.float32, torch.bfloat16, torch.float64
    yield "groups of every plain dtype", lambda: FusedAdamW(
        [{"params": params(device, f32, (4, 3), (3,))},
         {"params": params(device, bf16, (5,), (2, 2)), "lr": 0.5, "amsgrad": True},
         {"params": params(device, f64, (7,)), "weight_decay": 0.0, "maximize": True},
         {"params": params(device, f32, (6,)), "betas": (0.8, 0.9), "eps": 1e-6}], lr=1e-3)
    yield "in-op schedule and complex parameters", lambda: FusedAdamW(
        [{"params": params(device, f32, (3, 3), (2,), complex_=True)}, {"params": params(device, f32, (5,))}],
        lr=1.0, schedule=Noam(16, 4))
    yield "master weights of both forms and bfloat16 moments", lambda: FusedAdamW(
        [{"params": params(device, bf16, (8,), (3, 5)), "master_weights": "float32"},
         {"params": params(device, bf16, (4,)), "master_weights": "remainder", "moment_dtype": bf16},
         {"params": params(device, f32, (6,)), "moment_dtype": bf16, "amsgrad": True},
         {"params": params(device, torch.float16, (5,)), "master_weights": "float32"}],
        lr=1e-3, schedule=WarmupCosine(warmup_steps=3, total_steps=20))
    yield "stochastic rounding with seeds", lambda: FusedAdamW(
        [{"params": params(device, bf16, (9,), (2, 7)), "stochastic_rounding": True, "seed": 5},
         {"params": params(device, bf16, (3,)), "stochastic_rounding": True, "moment_dtype": bf16, "seed": 6},
         {"params": params(device, bf16, (4,))}], lr=1e-3)


def bfloat16_gradients_of_float32(device):
    opt = FusedAdamW(params(device, torch.float32, (4,), (5, 2)), lr=1e-3)
    return opt


def step_once(opt, grad_dtype=None):
    for group in opt.param_groups:
        for p in group["params"]:
            assign_grad(p, torch.randn(p.shape, dtype=grad_dtype or p.dtype, device=p.device))
    opt.step()   # the eager step creates the state; then both plans read the same


def eager_calls(opt):
    calls = {}
    for call in _C.planned_calls(opt.param_groups, opt.state, opt._shards):
        key = (str(call["device"]), *call["storage"], call["amsgrad"], call["stochastic_rounding"])
        assert key not in calls, f"two eager calls for {key}: parameters sharing memory are not in these tests"
        calls[key] = {k: [tuple(w) for w in call[k]] if k == "where" else list(call[k])
                      for k in ("where", "groups", "rng_streams", "element_offsets")}
    return calls


def traced_calls(opt):
    hyper, calls = _traceable_calls(opt)
    out = {}
    for (device, param, grad, moment, master, amsgrad, rounding), call in calls.items():
        key = (str(device), storage_name(param), storage_name(grad), storage_name(moment), master or "none", amsgrad, rounding)
        out[key] = {k: list(call[k]) for k in ("where", "groups", "rng_streams", "element_offsets")}
    return hyper, out


def storage_name(dtype):
    """The name _C.planned_calls (and _C.supported_storage) gives a dtype: "float32", ..."""
    return str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", [name for name, _ in configurations("cpu")] + ["bfloat16 gradients of float32"])
def test_the_eager_and_compiled_steps_plan_the_same_calls(device, name):
    if name == "bfloat16 gradients of float32":
        opt = bfloat16_gradients_of_float32(device)
        step_once(opt, grad_dtype=torch.bfloat16)
    else:
        opt = dict(configurations(device))[name]()
        step_once(opt)
    eager = eager_calls(opt)
    traced_hyper, traced = traced_calls(opt)
    assert eager == traced
    assert len(eager) >= 1
    eager_hyper, _ = opt._hyper_tables()
    assert torch.equal(eager_hyper, traced_hyper)


@pytest.mark.cuda
def test_mixed_devices_plan_a_call_per_device():
    opt = FusedAdamW([{"params": params("cpu", torch.float32, (3,))},
                      {"params": params("cuda", torch.float32, (4,))}], lr=1e-3)
    step_once(opt)
    eager = eager_calls(opt)
    assert eager == traced_calls(opt)[1]
    assert {key[0] for key in eager} == {"cpu", "cuda:0"}

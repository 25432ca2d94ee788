"""Fewer bytes per parameter: master weights (float32, or int16 remainders), bfloat16
moments, bfloat16 gradients of float32 parameters, and stochastic rounding, on the CPU op
(the host run of the CUDA kernels has its own tests in test_cuda_emulation.py).

What must hold, and with which tolerance:
- Master weights, both forms: the float32 master and the moments are bit for bit those of
  FusedAdamW run on float32 copies of the parameters (same math, same roundings: tolerance
  0), the two forms agree bit for bit with each other, and the bfloat16 parameter is the
  master rounded to nearest with ties away from zero (what a 16-bit remainder can undo;
  adamw_math.h, split_master). A float16 parameter is its float32 master rounded to
  nearest even.
- bfloat16 moments: bit for bit a reference written with torch ops (torch.optim.AdamW's
  single-tensor update on float32 copies of the moments, then rounded to bfloat16, to
  nearest even); parameters within 1e-6, as the float32 parity tests (torch's CPU sqrt is
  not correctly rounded, ours is).
- bfloat16 gradients: bit for bit the same step with the gradients converted first.
- Stochastic rounding: every stored bfloat16 is the float32 result plus the generator's
  16 bits, truncated (checked against the generator written again here with numpy), so
  the bits do not depend on threads or instruction sets; the rounding is unbiased; the
  seed is in state_dict() and a resumed run draws the same bits.
"""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import noam_ext
from mixed_grads import assign_grad
from noam_ext import FusedAdamW
from noam_ext._extension import _C
from noam_ext._storage import master_of, rounding_stream

KW = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1)
SIZES = [(3, 5), (257,), (40000,), (1,), (64, 33)]   # tails, a multi-thread range, a single element


def make_params(dtype, seed=0, sizes=SIZES):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=generator).to(dtype)) for s in sizes]


def grads_for(params, step, dtype=None):
    generator = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=generator).to(dtype or p.dtype) for p in params]


def rounded_away(master: torch.Tensor) -> torch.Tensor:
    """The bfloat16 nearest to each float32, ties away from zero (split_master's rounding)."""
    bits = master.view(torch.int32)
    return ((bits + 0x8000) & -0x10000).view(torch.float32).to(torch.bfloat16)



def groups_of(params, **options):
    # Two groups with different hyperparameters; amsgrad and maximize in the second.
    return [{"params": params[:2]}, {"params": params[2:], "amsgrad": True, "maximize": True, "lr": 3e-3}]


# ---- master weights ------------------------------------------------------------------------

@pytest.mark.parametrize("moment_dtype", [None, torch.bfloat16], ids=["float32-moments", "bfloat16-moments"])
def test_both_master_forms_give_the_float32_run_bit_for_bit(moment_dtype):
    base = make_params(torch.bfloat16)
    forms = {}
    for form in ("float32", "remainder"):
        params = [torch.nn.Parameter(p.detach().clone()) for p in base]
        opt = FusedAdamW(groups_of(params), **KW, master_weights=form, moment_dtype=moment_dtype,
                         schedule=noam_ext.WarmupCosine(warmup_steps=3, total_steps=20))
        forms[form] = (params, opt)
    ref_params = [torch.nn.Parameter(p.detach().float()) for p in base]
    ref = FusedAdamW(groups_of(ref_params), **KW, moment_dtype=moment_dtype,
                     schedule=noam_ext.WarmupCosine(warmup_steps=3, total_steps=20))
    for step in range(12):
        grads = grads_for(base, step, torch.bfloat16)
        for params, opt in forms.values():
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        for p, g in zip(ref_params, grads):
            p.grad = g.float()   # the same values, converted first
        ref.step()
        (pf, of), (pr, orr) = forms["float32"], forms["remainder"]
        for i, q in enumerate(ref_params):
            master_f = of.state[pf[i]]["master_param"]
            master_r = master_of(pr[i].detach(), orr.state[pr[i]]["master_remainder"])
            assert torch.equal(master_f, q.detach()), (step, i)
            assert torch.equal(master_r, q.detach()), (step, i)
            assert torch.equal(pf[i].detach(), rounded_away(q.detach()))
            assert torch.equal(pr[i].detach(), pf[i].detach())
            keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if i >= 2 else ())
            for key in keys:
                assert torch.equal(of.state[pf[i]][key], ref.state[q][key]), (step, i, key)
                assert torch.equal(orr.state[pr[i]][key], ref.state[q][key]), (step, i, key)


def test_float16_parameters_with_a_float32_master():
    base = make_params(torch.float16)
    params = [torch.nn.Parameter(p.detach().clone()) for p in base]
    ref_params = [torch.nn.Parameter(p.detach().float()) for p in base]
    opt = FusedAdamW(params, **KW, master_weights="float32")
    ref = FusedAdamW(ref_params, **KW)
    for step in range(6):
        grads = grads_for(base, step, torch.float16)
        for p, q, g in zip(params, ref_params, grads):
            p.grad, q.grad = g, g.float()
        opt.step()
        ref.step()
    for p, q in zip(params, ref_params):
        assert torch.equal(opt.state[p]["master_param"], q.detach())
        assert torch.equal(p.detach(), q.detach().to(torch.float16))
        assert opt.state[p]["exp_avg"].dtype == torch.float32


def test_small_updates_accumulate_in_the_master_where_bfloat16_stalls():
    # The example: 16,384 bfloat16 parameters at 1.0, lr 1e-4, 200 steps of
    # positive gradients. Round-to-nearest loses every update; masters keep them.
    moved = {}
    for form in (None, "float32", "remainder"):
        p = torch.nn.Parameter(torch.ones(16384, dtype=torch.bfloat16))
        opt = FusedAdamW([p], lr=1e-4, weight_decay=0.0, master_weights=form)
        for _ in range(200):
            p.grad = torch.ones_like(p)
            opt.step()
        moved[form] = float((1.0 - p.detach().float()).mean())
    assert moved[None] == 0.0
    assert moved["float32"] == moved["remainder"] > 0.015


def test_a_torch_checkpoint_loads_into_a_master_weight_optimizer():
    base = make_params(torch.bfloat16, sizes=[(7, 3), (100,)])
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in base]
    torch_opt = torch.optim.AdamW(theirs, **KW)
    for step in range(3):
        for p, g in zip(theirs, grads_for(theirs, step)):
            p.grad = g
        torch_opt.step()
    ours = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    opt = FusedAdamW(ours, **KW, master_weights="remainder")
    opt.load_state_dict(torch_opt.state_dict())
    for p, q in zip(ours, theirs):
        # Moments kept in float32 (the option's dtype), from torch's bfloat16 values.
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(opt.state[p]["exp_avg"], torch_opt.state[q]["exp_avg"].float())
    for p, g in zip(ours, grads_for(ours, 3)):
        p.grad = g
    opt.step()   # the master is made from the parameter at this step
    for p in ours:
        assert opt.state[p]["master_remainder"].dtype == torch.int16
        assert float(opt.state[p]["step"]) == 4


def test_our_checkpoint_loads_into_torch_and_switches_master_forms_exactly():
    params = make_params(torch.bfloat16, sizes=[(5, 4), (33,)])
    opt = FusedAdamW(params, **KW, master_weights="float32")
    for step in range(3):
        for p, g in zip(params, grads_for(params, step)):
            p.grad = g
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    # torch.optim.AdamW takes it (moments cast to the parameters' bfloat16; masters ignored).
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in params]
    torch_opt = torch.optim.AdamW(theirs, **KW)
    torch_opt.load_state_dict(saved)
    assert torch_opt.state[theirs[0]]["exp_avg"].dtype == torch.bfloat16
    # The remainder form takes it too, converting the float32 masters exactly.
    others = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other = FusedAdamW(others, **KW, master_weights="remainder")
    other.load_state_dict(saved)
    for p, q in zip(params, others):
        assert torch.equal(master_of(q.detach(), other.state[q]["master_remainder"]), opt.state[p]["master_param"])
        assert other.state[q]["exp_avg"].dtype == torch.float32


# ---- 16-bit moments and gradients -----------------------------------------------------------

def torch_reference_step(p, g, m16, v16, step, lr, betas, eps, weight_decay):
    """torch.optim.AdamW's single-tensor update on float32 copies of bfloat16 moments,
    rounded back to bfloat16 (to nearest even), as the op stores them."""
    m, v = m16.float(), v16.float()
    beta1, beta2 = betas
    p.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-lr / bias_correction1)
    return m.to(torch.bfloat16), v.to(torch.bfloat16)


def test_bfloat16_moments_of_float32_parameters_match_a_torch_reference():
    params = make_params(torch.float32)
    ref = [p.detach().clone() for p in params]
    moments = [(torch.zeros_like(p, dtype=torch.bfloat16), torch.zeros_like(p, dtype=torch.bfloat16)) for p in ref]
    opt = FusedAdamW(params, **KW, moment_dtype=torch.bfloat16)
    for step in range(1, 9):
        grads = grads_for(params, step)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for i, (q, g) in enumerate(zip(ref, grads)):
            moments[i] = torch_reference_step(q, g, *moments[i], step, KW["lr"], KW["betas"], KW["eps"],
                                              KW["weight_decay"])
            state = opt.state[params[i]]
            assert state["exp_avg"].dtype == torch.bfloat16
            assert torch.equal(state["exp_avg"], moments[i][0]), (step, i)
            assert torch.equal(state["exp_avg_sq"], moments[i][1]), (step, i)
            torch.testing.assert_close(params[i].detach(), q, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("moment_dtype", [None, torch.bfloat16], ids=["float32-moments", "bfloat16-moments"])
def test_bfloat16_gradients_of_float32_parameters_are_read_as_converted(moment_dtype):
    low = make_params(torch.float32)
    high = [torch.nn.Parameter(p.detach().clone()) for p in low]
    opt_low = FusedAdamW(low, **KW, moment_dtype=moment_dtype)
    opt_high = FusedAdamW(high, **KW, moment_dtype=moment_dtype)
    for step in range(5):
        grads = grads_for(low, step, torch.bfloat16)
        for p, q, g in zip(low, high, grads):
            assign_grad(p, g)
            q.grad = g.float()
        opt_low.step()
        opt_high.step()
    for p, q in zip(low, high):
        assert torch.equal(p.detach(), q.detach())
        assert torch.equal(opt_low.state[p]["exp_avg_sq"], opt_high.state[q]["exp_avg_sq"])


# ---- stochastic rounding ------------------------------------------------------------------

M32 = np.uint64(0xFFFFFFFF)
MASK64 = (1 << 64) - 1


def mix64(x: int) -> int:
    """splitmix64's finaliser, written again from its definition (the reference)."""
    x &= MASK64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & MASK64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def as_int64(value: int) -> int:
    """An unsigned 64-bit value as the op's int64 arguments carry it."""
    return value - (1 << 64) if value >= 1 << 63 else value


@pytest.mark.parametrize("seed,group,index,salt", [(0, 0, 0, 0), (7, 0, 1, 0), (2**63 - 1, 3, 2**20, 0),
                                                    (12345, 1, 2, 0xDEADBEEF | 1)])
def test_rounding_streams_and_shard_salts_are_the_documented_hashes(seed, group, index, salt):
    """_C's streams (what the step and the compiled step use) against docs/adamw.md's
    definition: mix64(seed ^ mix64(group << 32 | index)), salted by mix64(stream ^ salt)."""
    stream = mix64(seed ^ mix64((group << 32) | index))
    expected = stream if salt == 0 else mix64(stream ^ salt)
    assert _C.rounding_stream(seed, group, index, salt) == as_int64(expected)
    offsets = [index, group, seed % 1000]
    folded = 0
    for offset in offsets:
        folded = mix64(folded ^ offset)
    assert _C.shard_salt(offsets) == folded | 1


def test_master_conversions_are_the_ops_split_and_join():
    """_C's remainders and masters (checkpoint conversion) against torch bit arithmetic:
    round to nearest, ties away from zero, on the float32 bits; a NaN's remainder is 0."""
    master = torch.cat([torch.randn(1000) * 10.0 ** torch.randint(-30, 30, (1000,)),
                        torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])])
    bits = master.view(torch.int32)
    rounded = (bits + 0x8000) & -0x10000
    remainder = torch.where(master.isnan(), 0, bits - rounded).to(torch.int16)
    assert torch.equal(_C.remainders_of_masters(master), remainder)
    param = (rounded >> 16).to(torch.int16).view(torch.bfloat16)
    finite = ~master.isnan()
    assert torch.equal(_C.masters_of_remainders(param, remainder)[finite], master[finite])
    assert torch.equal(master_of(param, remainder)[finite], master[finite])
    strided = master[:1000].reshape(40, 25).t()   # a layout kept as the master's
    assert _C.remainders_of_masters(strided).stride() == strided.stride()


def _mix32(x):
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7FEB352D)) & M32
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x846CA68B)) & M32
    return x ^ (x >> np.uint64(16))


def rounding_key(stream, step, pair, high):
    h = mix64(stream ^ mix64(step * 4 + pair) ^ (high << 32))
    return (h ^ (h >> 32)) & 0xFFFFFFFF


def rounding_bits(stream, step, pair, indices):
    """adamw_math.h's generator, written again with numpy: 32 bits per element index."""
    indices = np.asarray(indices, dtype=np.uint64)
    out = np.empty_like(indices)
    for high in np.unique(indices >> np.uint64(32)):
        where = (indices >> np.uint64(32)) == high
        key = np.uint64(rounding_key(stream, step, pair, int(high)))
        low = indices[where] & M32
        out[where] = _mix32((((low * np.uint64(0x9E3779B9)) & M32) + key) & M32)
    return out


def stochastic_reference(x32: torch.Tensor, random16: np.ndarray) -> torch.Tensor:
    """stochastic_bfloat16_value: the float32 bits plus 16 random bits, truncated."""
    bits = x32.view(torch.int32).numpy().astype(np.int64) & 0xFFFFFFFF
    rounded = ((bits + (random16.astype(np.int64) & 0xFFFF)) & 0xFFFF0000).astype(np.uint32)
    return torch.from_numpy(rounded.view(np.int32)).view(torch.float32).to(torch.bfloat16)


def op_call(params, grads, moments, step, **kwargs):
    hyper = torch.zeros(1, noam_ext._hyper.NUM_HYPER_COLUMNS, dtype=torch.float64)
    hyper[0, noam_ext._hyper.LR], hyper[0, noam_ext._hyper.BETA1], hyper[0, noam_ext._hyper.BETA2] = 1e-2, 0.9, 0.98
    hyper[0, noam_ext._hyper.EPS], hyper[0, noam_ext._hyper.WEIGHT_DECAY] = 1e-8, 0.1
    steps = [torch.tensor(float(step)) for _ in params]
    torch.ops.noam_ext.fused_adamw_(params, grads, [m for m, _ in moments], [v for _, v in moments], [], steps,
                                    torch.tensor([0]), hyper, [0] * len(params), **kwargs)


@pytest.mark.parametrize("offset", [0, 2**32 - 37, 3 * 2**32 + 5], ids=["offset-0", "across-2**32", "high-offset"])
def test_stochastic_rounding_adds_the_generators_bits_and_truncates(offset):
    # One bfloat16 parameter with bfloat16 moments (the 14-byte layout), one step from a
    # random state; the reference is the same step in float32, then the bits.
    generator = torch.Generator().manual_seed(5)
    n, stream, step = 1000, 0x1234_5678_9ABC_DEF0, 6

    def fresh():
        torch.manual_seed(0)
        return (torch.randn(n).to(torch.bfloat16), torch.randn(n, generator=generator).to(torch.bfloat16),
                torch.randn(n).to(torch.bfloat16), torch.rand(n).to(torch.bfloat16))
    p, g, m, v = fresh()
    p32, m32, v32 = p.float(), m.float(), v.float()
    op_call([p32], [g.float()], [(m32, v32)], step)           # the float32 results before rounding
    op_call([p], [g], [(m, v)], step, stochastic_rounding=True, rng_streams=[as_int64(stream)],
            element_offsets=[offset])
    indices = offset + np.arange(n, dtype=np.uint64)
    a = rounding_bits(stream, step + 1, 0, indices)   # the key uses the step after its increment
    b = rounding_bits(stream, step + 1, 1, indices)
    assert torch.equal(p, stochastic_reference(p32, a & np.uint64(0xFFFF)))
    assert torch.equal(m, stochastic_reference(m32, a >> np.uint64(16)))
    assert torch.equal(v, stochastic_reference(v32, b & np.uint64(0xFFFF)))


def test_stochastic_rounding_is_unbiased():
    # 1e6 elements whose update is below half a bfloat16 ulp: round-to-nearest drops
    # every one, stochastic rounding keeps them on average.
    n = 1_000_000
    torch.manual_seed(0)
    start = (1.0 + torch.rand(n)).to(torch.bfloat16)
    grads = torch.rand(n).to(torch.bfloat16) + 0.5
    reference = torch.nn.Parameter(start.float())
    rounded = torch.nn.Parameter(start.clone())
    kwargs = dict(lr=2e-4, weight_decay=0.0)
    ref_opt, sr_opt = FusedAdamW([reference], **kwargs), FusedAdamW([rounded], **kwargs, stochastic_rounding=True,
                                                                      seed=1)
    reference.grad, rounded.grad = grads.float(), grads
    ref_opt.step()
    sr_opt.step()
    error = (rounded.detach().double() - reference.detach().double()).numpy()
    ulp = (start.float().view(torch.int32) & 0x7F800000).view(torch.float32).double().numpy() * 2.0**-7
    scaled = error / ulp
    assert np.all(np.abs(scaled) < 1)                        # one of the two neighbours
    standard_error = scaled.std() / np.sqrt(n)
    assert abs(scaled.mean()) < 4 * standard_error, (scaled.mean(), standard_error)
    # Round-to-nearest would be biased by the whole update (here 0.1-0.4 ulp).
    assert abs((reference.detach().double() - start.double()).numpy().mean() / ulp.mean()) > 50 * standard_error


SCRIPT = r"""
import json, sys, torch, noam_ext
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
params = [torch.nn.Parameter(torch.randn(n).to(torch.bfloat16)) for n in (5, 70000, 33)]
opt = noam_ext.FusedAdamW(params, lr=1e-2, stochastic_rounding=True, seed=11, moment_dtype=torch.bfloat16)
for step in range(3):
    for p in params:
        p.grad = torch.randn(p.shape).to(torch.bfloat16)
    opt.step()
out = {"capability": noam_ext.cpu_capability()}
out["bits"] = [t.view(torch.int16).tolist() for p in params for t in (p.detach(), opt.state[p]["exp_avg"])]
print(json.dumps(out))
"""


def test_stochastic_rounding_bits_do_not_depend_on_threads_or_instruction_sets():
    results = {}
    for capability in noam_ext.build_info()["cpu_capabilities_compiled"]:
        for threads in (1, 2):
            env = dict(os.environ, NOAM_EXT_CPU_CAPABILITY=capability)
            run = subprocess.run([sys.executable, "-c", SCRIPT, str(threads)], env=env, capture_output=True,
                                 text=True, cwd=os.path.dirname(__file__), check=True)
            results[(capability, threads)] = json.loads(run.stdout)
    baseline = results[("default", 1)]["bits"]
    for key, result in results.items():
        assert result["bits"] == baseline, key


def test_the_seed_is_in_the_state_dict_and_a_resumed_run_draws_the_same_bits():
    def run(steps, opt=None, params=None):
        if params is None:
            params = make_params(torch.bfloat16, sizes=[(300,), (7, 9)])
            opt = FusedAdamW(params, **KW, stochastic_rounding=True, moment_dtype=torch.bfloat16)
        for step in steps:
            for p, g in zip(params, grads_for(params, step)):
                p.grad = g
            opt.step()
        return params, opt

    torch.manual_seed(3)
    straight, opt = run(range(6))
    torch.manual_seed(3)
    first, opt_first = run(range(3))
    saved = copy.deepcopy(opt_first.state_dict())
    assert saved["param_groups"][0]["seed"] == opt.param_groups[0]["seed"]
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in first]
    resumed = FusedAdamW(resumed_params, **KW, stochastic_rounding=True, moment_dtype=torch.bfloat16, seed=12345)
    resumed.load_state_dict(saved)   # the saved seed replaces 12345
    run(range(3, 6), resumed, resumed_params)
    for a, b in zip(straight, resumed_params):
        assert torch.equal(a.detach(), b.detach())
    # Another seed draws other bits.
    other_params = [torch.nn.Parameter(p.detach().clone()) for p in first]
    other = FusedAdamW(other_params, **KW, stochastic_rounding=True, moment_dtype=torch.bfloat16, seed=99)
    run(range(3, 6), other, other_params)
    assert not all(torch.equal(a.detach(), b.detach()) for a, b in zip(straight, other_params))


def test_streams_are_the_same_in_python_and_in_the_step():
    # The compiled step computes streams in Python (noam_ext._storage); the eager step in
    # C++: both must give the same bits.
    params = make_params(torch.bfloat16, sizes=[(300,), (40,)])
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    a = FusedAdamW(params, **KW, stochastic_rounding=True, seed=7)
    b = FusedAdamW(twins, **KW, stochastic_rounding=True, seed=7)
    for step in range(2):
        for p, q, g in zip(params, twins, grads_for(params, step)):
            p.grad, q.grad = g, g.clone()
        a.step()
        noam_ext.optimizer._traceable_step(b)   # the Python path torch.compile traces
    for p, q in zip(params, twins):
        assert torch.equal(p.detach(), q.detach())
    assert rounding_stream(7, 0, 1) != rounding_stream(7, 0, 0)


# ---- refused combinations -------------------------------------------------------------------

@pytest.mark.parametrize("dtype,options,message", [
    (torch.float32, dict(master_weights="float32"), "is float32, its own master"),
    (torch.float16, dict(master_weights="remainder"), "needs bfloat16 parameters"),
    (torch.float16, dict(stochastic_rounding=True), "stores nothing in bfloat16"),
    (torch.float32, dict(stochastic_rounding=True), "stores nothing in bfloat16"),
    (torch.bfloat16, dict(master_weights="float32", stochastic_rounding=True), "stores nothing in bfloat16"),
    (torch.float64, dict(moment_dtype=torch.bfloat16), "float32, bfloat16 and float16 parameters"),
    (torch.complex64, dict(moment_dtype=torch.bfloat16), "float32, bfloat16 and float16 parameters"),
    (torch.float16, dict(moment_dtype=torch.bfloat16), "not supported"),
], ids=["master-on-float32", "remainder-on-float16", "rounding-float16", "rounding-float32",
        "rounding-with-master", "float64", "complex", "float16-bf16-moments"])
def test_unsupported_combinations_are_refused_naming_the_parameter(dtype, options, message):
    p = torch.nn.Parameter(torch.zeros(3, dtype=dtype))
    with pytest.raises(ValueError, match=message) as error:
        FusedAdamW([p], **options)
    assert "parameter 0 of param group 0" in str(error.value)


@pytest.mark.parametrize("options,message", [
    (dict(master_weights="fp32"), "Invalid master_weights"),
    (dict(moment_dtype=torch.float16), "Invalid moment_dtype"),
    (dict(stochastic_rounding=1), "Invalid stochastic_rounding"),
    (dict(stochastic_rounding=True, seed=-1), "Invalid seed"),
])
def test_bad_option_values_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        FusedAdamW([torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))], **options)


def test_a_bad_param_group_leaves_the_optimizer_as_it_was():
    opt = FusedAdamW([torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))], master_weights="remainder")
    with pytest.raises(ValueError, match="needs bfloat16"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))]})
    assert len(opt.param_groups) == 1


def test_without_options_param_groups_have_torchs_keys_and_with_them_the_options():
    plain = FusedAdamW([torch.nn.Parameter(torch.zeros(2))]).param_groups[0]
    assert "master_weights" not in plain and "seed" not in plain
    group = FusedAdamW([torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))], master_weights="remainder",
                       stochastic_rounding=False, moment_dtype=torch.bfloat16).param_groups[0]
    assert group["master_weights"] == "remainder" and group["moment_dtype"] == torch.bfloat16


def test_a_moment_of_the_wrong_dtype_in_the_state_is_an_error_naming_the_parameter():
    params = make_params(torch.float32, sizes=[(4,), (5,)])
    opt = FusedAdamW(params, **KW)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.state[params[1]]["exp_avg"] = opt.state[params[1]]["exp_avg"].to(torch.float16)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="parameter 1 of param group 0"):
        opt.step()
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, params))


def test_stochastic_rounding_bits_do_not_depend_on_the_gradient_s_layout():
    # A dense transposed parameter: its gradient in the parameter's layout (as autograd makes
    # it) or contiguous (a strided row) must give the same bits, element k being the k-th in
    # the parameter's memory either way.
    base = torch.randn(48, 40, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    grad = torch.randn(40, 48, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    results = []
    for contiguous_grad in (False, True):
        p = torch.nn.Parameter(base.clone().t())   # shape (40, 48), strides (1, 40)
        opt = FusedAdamW([p], **KW, stochastic_rounding=True, moment_dtype=torch.bfloat16, seed=3)
        for _ in range(3):
            p.grad = grad.contiguous() if contiguous_grad else grad.t().contiguous().t()
            assert p.grad.is_contiguous() == contiguous_grad
            opt.step()
        results.append((p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}))
    (p0, s0), (p1, s1) = results
    assert torch.equal(p0.view(torch.int16), p1.view(torch.int16))
    for key in s0:   # bfloat16 moments compared as bits, the step as a value
        bits = (lambda t: t.view(torch.int16)) if s0[key].dtype == torch.bfloat16 else (lambda t: t)
        assert torch.equal(bits(s0[key]), bits(s1[key])), key

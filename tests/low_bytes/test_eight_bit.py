"""8-bit moments (FusedAdamW(moment_dtype="8bit")) on the CPU op: exp_avg and exp_avg_sq (and
max_exp_avg_sq) stored as codes of bitsandbytes' dynamic maps with a float32 scale per block of
256 elements (csrc/noam_ext/quantization.h, docs/eight_bit_state.md).

What must hold, and with which tolerance:
- The maps are bitsandbytes' bit for bit (rebuilt here by the study script's copy of
  bitsandbytes' algorithm).
- The encoder gives the nearest code, ties to the lower code, checked against a float64 argmin
  over the decoded map on adversarial inputs (map values, midpoints and their float32
  neighbours, random values); a positive exp_avg_sq never gets the zero code.
- Each step, against an independent float64 reference of the same algorithm (decode, torch's
  AdamW update, absmax per block, nearest code), started from the op's own state: scales
  within float32 rounding (rel. 1e-6), every code within one step, and the codes identical
  except where the float64 value lies within float32 rounding of a midpoint (a tie for the
  float32 op). Parameters within 1e-5 of the float64 update (float32 math: torch's own parity
  tolerance for float32 is 1e-6 relative; the decoded moments add a rounding each).
- Every option composes, bit for bit: a FusedAdamW with float32 moments whose state is replaced
  after every step by the op's own 8-bit encoding of it takes exactly the 8-bit run's steps
  (parameters, masters, codes, scales), since the 8-bit step updates from decoded moments and
  encodes the float32 results with the same encoder. bfloat16 parameters with stochastic
  rounding have no float32-moment twin: there each parameter is checked to be one of the two
  bfloat16 neighbours of the float32 result, and both occur.
- Threads do not change a bit; checkpoints resume bit for bit and convert both ways (torch,
  bitsandbytes); bad input is refused naming the parameter, before anything changes.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import noam_ext
import sibling_tests
from mixed_grads import assign_grad
from noam_ext import FusedAdamW
from noam_ext._extension import _C
from noam_ext._storage import QUANTIZED_KEYS, dequantize_moment, quantize_moment

KW = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1)
SIZES = [(3, 5), (257,), (40000,), (1,), (64, 33), (512,)]   # tails, whole blocks, a multi-thread range
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def make_params(dtype=torch.float32, seed=0, sizes=SIZES):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=generator).to(dtype)) for s in sizes]


def grads_for(params, step, dtype=None, spread=True):
    """Gradients whose magnitudes span several decades within a block (as real ones do)."""
    generator = torch.Generator().manual_seed(1000 + step)
    out = []
    for p in params:
        g = torch.randn(p.shape, generator=generator)
        if spread:
            g = g * torch.exp(4 * torch.randn(p.shape, generator=generator))
        out.append(g.to(dtype or p.dtype))
    return out


def bnb_maps():
    study = sibling_tests.load("../benchmarks/quantization_maps.py")
    return study.bnb_dynamic_map(True), study.bnb_dynamic_map(False)


# ---- the maps and the encoder -----------------------------------------------------------------

@pytest.mark.parametrize("signed", [True, False])
def test_maps_are_bitsandbytes_dynamic_maps_within_two_ulps(signed):
    # Ours are computed by arithmetic (fma(2j + 1, 0.45 * 2^-L, 0.1) * 10^(d-6)); bitsandbytes'
    # come from torch.linspace: they agree to 2 ulps, and exactly in most values.
    ours, theirs = _C.quantization_map(signed), bnb_maps()[0 if signed else 1]
    ulps = (ours.view(torch.int32).long() - theirs.view(torch.int32).long()).abs()
    assert ulps.max() <= 2
    assert int((ulps == 0).sum()) >= 160
    assert torch.all(ours[1:] > ours[:-1])


def nearest_codes_float64(y: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """argmin |map - y| in float64, ties to the lower code."""
    distance = (qmap.double()[None, :] - y.double()[:, None]).abs()
    return distance.argmin(dim=1)   # argmin returns the first (lowest) index of a tie


def adversarial_inputs(qmap: torch.Tensor, signed: bool) -> torch.Tensor:
    values = qmap.double()
    mids = (values[1:] + values[:-1]) / 2
    points = torch.cat([values, mids])
    as_float = points.float()
    near = torch.cat([as_float, torch.nextafter(as_float, torch.tensor(2.0)),
                      torch.nextafter(as_float, torch.tensor(-2.0))])
    generator = torch.Generator().manual_seed(0)
    random = torch.rand(20000, generator=generator) * (2 if signed else 1) - (1 if signed else 0)
    tiny = torch.exp(torch.empty(20000).uniform_(-40, 0, generator=generator)) * (
        torch.randint(0, 2, (20000,), generator=generator) * 2 - 1 if signed else 1)
    y = torch.cat([near, random, tiny.float(), torch.tensor([0.0, 1.0])])
    return y.clamp(-1 if signed else 0, 1)


@pytest.mark.parametrize("signed", [True, False])
def test_encoder_is_the_exact_nearest_code(signed):
    qmap = _C.quantization_map(signed)
    y = adversarial_inputs(qmap, signed)
    # One block whose scale is exactly 1 (a 1.0 element), so that the op encodes y itself.
    blocks = torch.split(y, 255)
    for chunk in blocks:
        values = torch.cat([torch.tensor([1.0]), chunk])
        codes, scales = _C.quantize_blocks(values, signed)
        assert scales.tolist() == [1.0]
        expected = nearest_codes_float64(values, qmap)
        if not signed:   # the zero rule: a positive value never gets the zero code
            expected = torch.where((values > 0) & (expected == 0), torch.ones_like(expected), expected)
        assert torch.equal(codes.long(), expected), (values[codes.long() != expected][:5],)


VECTOR_SCRIPT = r"""
import json, sys, torch, noam_ext
from noam_ext._extension import _C
values = torch.tensor(json.loads(sys.stdin.read()))
# betas (0, 0): the step stores exp_avg = g and exp_avg_sq = g * g exactly as computed, so the op's
# own (vector) encoder meets these values; lr 0 keeps the parameter.
p = torch.nn.Parameter(torch.zeros(values.numel()))
p.grad = values.clone()
opt = noam_ext.FusedAdamW([p], lr=0.0, betas=(0.0, 0.0), weight_decay=0.0, moment_dtype="8bit")
opt.step()
state = opt.state[p]
out = {k: state[k].tolist() for k in ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")}
out["capability"] = noam_ext.cpu_capability()
print(json.dumps(out))
"""


def vector_inputs() -> torch.Tensor:
    """Blocks of 256 whose first element sets the scale to 1 (exactly as encoded: y = g), then
    map values, midpoints and their float32 neighbours, values just past 1, -0.0, NaN, tiny and
    subnormal values; a block of subnormal values (a subnormal scale); a block of zeros."""
    pieces = []
    for signed in (True, False):
        qmap = _C.quantization_map(signed).double()
        mids = ((qmap[1:] + qmap[:-1]) / 2).float()
        for base in (qmap.float(), mids):
            for x in (base, torch.nextafter(base, torch.tensor(2.0)), torch.nextafter(base, torch.tensor(-2.0))):
                pieces.append(x)
    values = torch.cat(pieces)
    values = torch.cat([values, torch.tensor([1.0000001, -1.0000001, -0.0, 0.0, 1e-30, -1e-38, 1e-45])])
    blocks = [torch.cat([torch.tensor([1.0]), chunk]) for chunk in torch.split(values, 255)]
    blocks.append(torch.tensor([3e-39, -1e-39, 1e-45, 0.0] * 64))   # a subnormal block scale
    blocks.append(torch.zeros(256))
    blocks.append(torch.tensor([1.0, float("nan"), 0.5]))           # NaN: the block decodes to NaN
    return torch.cat(blocks)


def test_every_instruction_set_encodes_as_the_reference():
    """The op's vector encoder (every instruction set this build compiled) against the host
    reference (_C.quantize_blocks) on adversarial moments: the same codes and scales, bit for bit."""
    g = vector_inputs()
    expected = {}
    for signed, key, x in ((True, "exp_avg", g), (False, "exp_avg_sq", g * g)):
        codes, scales = _C.quantize_blocks(x.contiguous(), signed)
        expected[key + "_codes"], expected[key + "_absmax"] = codes.tolist(), scales
    ran = []
    for capability in noam_ext.build_info()["cpu_capabilities_compiled"]:
        env = dict(os.environ, NOAM_EXT_CPU_CAPABILITY=capability)
        run = subprocess.run([sys.executable, "-c", VECTOR_SCRIPT], input=json.dumps(g.tolist()), env=env,
                             capture_output=True, text=True, check=True)
        got = json.loads(run.stdout)
        ran.append(got["capability"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert got[key + "_codes"] == expected[key + "_codes"], (capability, key)
            torch.testing.assert_close(torch.tensor(got[key + "_absmax"]), expected[key + "_absmax"], rtol=0,
                                       atol=0, equal_nan=True)
    assert "default" in ran


def test_a_subnormal_block_scale_keeps_its_values():
    x = torch.tensor([3e-39, -1e-39, 2e-39, 0.0] * 64)
    codes, scales = _C.quantize_blocks(x, True)
    decoded = _C.dequantize_blocks(codes, scales, True)
    assert decoded[0] == x[0] and torch.all(decoded[3::4] == 0)
    torch.testing.assert_close(decoded, x, rtol=0.02, atol=0)


def test_positive_second_moments_never_decode_to_zero():
    # Blocks spanning 1e-20 : 1 (the case that blows up the update with the reference map).
    v = torch.tensor([1.0] + [1e-20, 3e-9, 1e-7, 0.0] * 10)
    codes, scales = _C.quantize_blocks(v, False)
    decoded = _C.dequantize_blocks(codes, scales, False)
    assert torch.all((decoded > 0) == (v > 0))


# ---- each step against a float64 reference ----------------------------------------------------

def reference_step(p, g, decoded, step, lr, beta1, beta2, eps, wd, amsgrad):
    """torch.optim.AdamW's single-tensor update in float64 from the decoded moments."""
    p, g = p.double(), g.double()
    m, v = decoded["exp_avg"].double(), decoded["exp_avg_sq"].double()
    p = p * (1 - lr * wd)
    m = m + (1 - beta1) * (g - m)
    v = v * beta2 + (1 - beta2) * g * g
    second = v
    out = {"exp_avg": m, "exp_avg_sq": v}
    if amsgrad:
        second = torch.maximum(decoded["max_exp_avg_sq"].double(), v)
        out["max_exp_avg_sq"] = second
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    p = p - lr / bc1 * m / (second.sqrt() / math.sqrt(bc2) + eps)
    return p, out


def reference_codes(x: torch.Tensor, signed: bool):
    """Codes, scales and "near a midpoint" flags of a float64 moment, block by block."""
    qmap = _C.quantization_map(signed).double()
    flat = x.reshape(-1)
    codes, scales, near = [], [], []
    mids = (qmap[1:] + qmap[:-1]) / 2
    for block in torch.split(flat, 256):
        absmax = block.abs().max()
        y = block / absmax if absmax > 0 else torch.zeros_like(block)
        code = nearest_codes_float64(y, qmap)
        if not signed:
            code = torch.where((block > 0) & (code == 0), torch.ones_like(code), code)
        distance = (y[:, None] - mids[None, :]).abs().min(dim=1).values
        codes.append(code)
        scales.append(absmax)
        near.append(distance <= 4 * 2.0 ** -24 * y.abs().clamp_min(2.0 ** -126))
    return torch.cat(codes), torch.stack(scales), torch.cat(near)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_every_step_matches_a_float64_reference(amsgrad):
    params = make_params()
    opt = FusedAdamW(params, moment_dtype="8bit", amsgrad=amsgrad, **KW)
    moments = MOMENTS if amsgrad else MOMENTS[:2]
    ties = total = 0
    for step in range(1, 16):
        grads = grads_for(params, step)
        before = [p.detach().clone() for p in params]
        decoded = [{k: dequantize_moment(p, k, opt.state[p]).double() if opt.state.get(p) else
                    torch.zeros(p.shape, dtype=torch.float64) for k in moments} for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for p, p0, g, dec in zip(params, before, grads, decoded):
            expected_p, expected = reference_step(p0, g, dec, step, KW["lr"], *KW["betas"], KW["eps"],
                                                  KW["weight_decay"], amsgrad)
            torch.testing.assert_close(p.detach().double(), expected_p, rtol=1e-5, atol=1e-6)
            for key in moments:
                codes_key, scales_key = QUANTIZED_KEYS[key]
                codes, scales, near = reference_codes(expected[key], key == "exp_avg")
                got_codes = opt.state[p][codes_key].reshape(-1).long()
                torch.testing.assert_close(opt.state[p][scales_key].double(), scales, rtol=1e-6, atol=0)
                differ = got_codes != codes
                assert (got_codes - codes).abs().max() <= 1, key
                assert not torch.any(differ & ~near), (key, step, int((differ & ~near).sum()))
                ties += int(differ.sum())
                total += differ.numel()
    assert ties <= total * 1e-3


# ---- every option, bit for bit against float32 moments re-encoded each step --------------------

def reencode(opt: FusedAdamW, eight: FusedAdamW) -> None:
    """Replaces the float32 moments of `opt` by what the op's encoder makes of them, decoded
    (what the 8-bit run holds), and checks the codes and scales against `eight`'s."""
    for pa, pb in zip(opt.param_groups_params(), eight.param_groups_params()):
        state, other = opt.state[pa], eight.state[pb]
        for key in MOMENTS:
            if key not in state:
                continue
            encoded = quantize_moment(pa, key, state[key])
            for name in QUANTIZED_KEYS[key]:
                assert torch.equal(encoded[name], other[name]), (name, tuple(pa.shape))
            state[key].copy_(dequantize_moment(pa, key, encoded))


def all_params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


FusedAdamW.param_groups_params = all_params   # for reencode (test helper only)

OPTIONS = {
    "plain": dict(),
    "amsgrad": dict(amsgrad=True),
    "maximize": dict(maximize=True),
    "no decay, low beta2": dict(weight_decay=0.0, betas=(0.8, 0.9)),
    "beta2 0.999": dict(betas=(0.9, 0.999), eps=1e-9),
    "schedule": dict(schedule=noam_ext.WarmupCosine(warmup_steps=3, total_steps=10)),
}


def run_pair(options, param_dtype=torch.float32, grad_dtype=None, master=None, sizes=SIZES, steps=8,
             transform=None, groups=False, scaler_clip=False):
    eight_params = make_params(param_dtype, sizes=sizes)
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in eight_params]
    if transform is not None:
        eight_params, twin_params = transform(eight_params), transform(twin_params)
    kw = {**KW, **options}
    extra = {} if master is None else dict(master_weights=master)

    def build(params, moment_dtype):
        if groups:
            return FusedAdamW([{"params": params[::2]}, {"params": params[1::2], "lr": 3e-3,
                                                        "weight_decay": 0.0}],
                              moment_dtype=moment_dtype, **kw, **extra)
        return FusedAdamW(params, moment_dtype=moment_dtype, **kw, **extra)

    eight = build(eight_params, "8bit")
    twin = build(twin_params, torch.float32)
    for step in range(steps):
        grads = grads_for(eight_params, step, grad_dtype)
        for a, b, g in zip(eight_params, twin_params, grads):
            assign_grad(a, g.clone())
            assign_grad(b, g.clone())
        if scaler_clip:
            for opt in (eight, twin):
                opt.clip_grad_norm_(0.5)
        eight.step()
        twin.step()
        for a, b in zip(eight_params, twin_params):
            assert torch.equal(a.detach(), b.detach()), (step, tuple(a.shape))
        reencode(twin, eight)
        if master is not None:
            key = "master_param" if master == "float32" else "master_remainder"
            for a, b in zip(eight_params, twin_params):
                assert torch.equal(eight.state[a][key], twin.state[b][key])
    return eight


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_options_compose_bit_for_bit(name):
    run_pair(OPTIONS[name])


def test_param_groups_and_fused_clipping_compose():
    run_pair({}, groups=True, scaler_clip=True)


def test_bfloat16_gradients_of_float32_parameters():
    run_pair({}, grad_dtype=torch.bfloat16)


@pytest.mark.parametrize("master", ["float32", "remainder"])
def test_bfloat16_parameters_with_masters(master):
    run_pair({}, param_dtype=torch.bfloat16, master=master)


def transposed(params):
    return [torch.nn.Parameter(p.detach().t().contiguous().t()) if p.dim() == 2 else p for p in params]


def test_parameters_laid_out_unlike_their_shape():
    # Transposed (dense, not contiguous): blocks run over memory order, as the op walks it.
    run_pair({}, transform=transposed)


def with_gaps(params):
    """Views with gaps (every other element of a wider tensor), walked in their shape's order."""
    return [torch.nn.Parameter(torch.stack([p.detach(), p.detach()], dim=-1)[..., 0]) for p in params]


def test_parameters_with_gaps():
    run_pair({"amsgrad": True}, transform=with_gaps, sizes=[(300,), (17, 33), (5,)])
    p = with_gaps([torch.nn.Parameter(torch.randn(4, 70))])[0]
    assert not p.is_contiguous()
    opt = FusedAdamW([p], moment_dtype="8bit")
    p.grad = torch.randn(4, 70)
    opt.step()
    assert opt.state[p]["exp_avg_codes"].is_contiguous()   # codes of a parameter with gaps: its shape's order


def test_grad_scaler_skips_and_unscales():
    params = make_params()
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    eight = FusedAdamW(params, moment_dtype="8bit", **KW)
    ref = FusedAdamW(twin, moment_dtype=torch.float32, **KW)
    for step in range(4):
        grads = grads_for(params, step)
        for opt, ps in ((eight, params), (ref, twin)):
            opt.grad_scale = torch.tensor(1024.0)
            opt.found_inf = torch.tensor(1.0 if step == 2 else 0.0)
            for p, g in zip(ps, grads):
                p.grad = g * 1024
            before = {k: v.clone() for k, v in opt.state[ps[0]].items()} if opt.state.get(ps[0]) else None
            opt.step()
            if step == 2:   # skipped: nothing changes
                for k, v in before.items():
                    assert torch.equal(opt.state[ps[0]][k], v)
        for a, b in zip(params, twin):
            assert torch.equal(a.detach(), b.detach())
        if step != 2:   # (re-encoding decoded moments is not the identity: a skipped step keeps them)
            reencode(ref, eight)


def test_bfloat16_parameters_with_stochastic_rounding():
    params = make_params(torch.bfloat16)
    twin = [torch.nn.Parameter(p.detach().float()) for p in params]
    eight = FusedAdamW(params, moment_dtype="8bit", stochastic_rounding=True, seed=3, **KW)
    ref = FusedAdamW(twin, moment_dtype="8bit", **KW)   # float32 parameters, the same 8-bit moments
    ups = downs = 0
    for step in range(5):
        grads = grads_for(params, step, torch.bfloat16)
        for a, b, g in zip(params, twin, grads):
            assign_grad(a, g)
            b.grad = g.float()
        eight.step()
        ref.step()
        for a, b in zip(params, twin):
            exact = b.detach()
            low = exact.to(torch.bfloat16)   # nearest; its neighbours bracket the exact value
            got = a.detach().float()
            down = torch.where(low.float() <= exact, low.float(), torch.nextafter(low, torch.tensor(
                -math.inf, dtype=torch.bfloat16)).float())
            up = torch.where(low.float() >= exact, low.float(), torch.nextafter(low, torch.tensor(
                math.inf, dtype=torch.bfloat16)).float())
            assert torch.all((got == down) | (got == up))
            ups += int(((got == up) & (up != down)).sum())
            downs += int(((got == down) & (up != down)).sum())
            # The moments of both runs are the same codes: the float32 run continues from the
            # bfloat16 parameter for the next step.
            for key in ("exp_avg_codes", "exp_avg_sq_codes"):
                assert torch.equal(eight.state[a][key], ref.state[b][key])
            b.data.copy_(a.detach().float())
    assert ups > 100 and downs > 100


def test_threads_do_not_change_a_bit():
    results = []
    for threads in (1, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            params = make_params(sizes=[(100003,), (70000,), (300,)])
            opt = FusedAdamW(params, moment_dtype="8bit", amsgrad=True, **KW)
            for step in range(3):
                for p, g in zip(params, grads_for(params, step)):
                    p.grad = g
                opt.step()
            results.append([(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in params])
        finally:
            torch.set_num_threads(previous)
    for (p1, s1), (p2, s2) in zip(*results):
        assert torch.equal(p1, p2)
        for key in s1:
            assert torch.equal(s1[key], s2[key]), key


def test_compiled_step_is_the_eager_step():
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        params = make_params(sizes=[(300,), (16, 17)])
        opt = FusedAdamW(params, moment_dtype="8bit", **KW)
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        for k in range(3):
            for p, g in zip(params, grads_for(params, k)):
                p.grad = g
            step()
        results.append([(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in params])
    for (p1, s1), (p2, s2) in zip(*results):
        assert torch.equal(p1, p2)
        for key in s1:
            assert torch.equal(s1[key], s2[key]), key


def test_opcheck():
    p = torch.randn(300)
    codes = [torch.full((300,), 127, dtype=torch.uint8), torch.zeros(300, dtype=torch.uint8)]
    scales = [torch.zeros(2), torch.zeros(2)]
    hyper = torch.tensor([[1e-3, 0.9, 0.999, 1e-8, 0.0, 0.0] + [0.0] * (
        _C.table_layout()["num_hyper_columns"] - 6)], dtype=torch.float64)
    torch.library.opcheck(torch.ops.noam_ext.fused_adamw_.default,
                          ([p], [torch.randn(300)], codes[:1], codes[1:], [], [torch.zeros((), dtype=torch.float32)],
                           torch.zeros(1, dtype=torch.int64), hyper, [0]),
                          {"moment_absmax": scales}, test_utils=("test_schema", "test_faketensor"))


# ---- state, checkpoints, memory ---------------------------------------------------------------

def test_state_is_codes_and_scales_under_named_keys():
    params = make_params(sizes=[(1000,), (5,)])
    opt = FusedAdamW(params, moment_dtype="8bit", amsgrad=True, **KW)
    for p, g in zip(params, grads_for(params, 0)):
        p.grad = g
    opt.step()
    state = opt.state_dict()["state"][0]
    assert sorted(state) == sorted(["step"] + [k for key in MOMENTS for k in QUANTIZED_KEYS[key]])
    assert state["exp_avg_codes"].dtype == torch.uint8 and state["exp_avg_codes"].shape == (1000,)
    assert state["exp_avg_absmax"].dtype == torch.float32 and state["exp_avg_absmax"].shape == (4,)
    assert opt.state_dict()["param_groups"][0]["moment_dtype"] == "8bit"


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_state_bytes_per_parameter(param_dtype):
    model = torch.nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True).to(param_dtype)
    extra = dict(stochastic_rounding=True) if param_dtype == torch.bfloat16 else {}
    opt = FusedAdamW(model.parameters(), moment_dtype="8bit", **KW, **extra)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    numel = sum(p.numel() for p in model.parameters())
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert state_bytes / numel <= 2.1, state_bytes / numel


def shaped_params():
    """Parameters whose scales are shaped (their last dimension whole blocks, walked last) or
    flat (a tail, a transposed layout walked in memory order, a 0-dim parameter)."""
    generator = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in [(6, 512), (3, 2, 256), (512, 6),
                                                                                 (1000,), ()]]
    return params + [torch.nn.Parameter(torch.randn(512, 6, generator=generator).t())]


SCALES_SHAPES = [(6, 2), (3, 2, 1), (12,), (4,), (1,), (12,)]


def test_scales_are_shaped_like_the_parameter_in_blocks_and_flat_ones_load():
    """Each moment's scales have the parameter's shape with its last dimension counted in
    blocks where that dimension is whole blocks and is walked last (so that a DTensor's scales
    shard as it does), and are flat otherwise; a checkpoint with flat scales (older ones,
    bitsandbytes') loads, reshaped, and resumes bit for bit."""
    factory = lambda ps: FusedAdamW(ps, moment_dtype="8bit", amsgrad=True, **KW)   # noqa: E731
    straight, resumed = shaped_params(), shaped_params()
    opt = train(factory, straight, 3)
    for p, shape in zip(straight, SCALES_SHAPES):
        for key in MOMENTS:
            assert opt.state[p][QUANTIZED_KEYS[key][1]].shape == shape, (tuple(p.shape), key)
    flat = copy.deepcopy(train(factory, resumed, 3).state_dict())
    for entry in flat["state"].values():
        for key in MOMENTS:
            entry[QUANTIZED_KEYS[key][1]] = entry[QUANTIZED_KEYS[key][1]].reshape(-1)
    again = factory(resumed)
    again.load_state_dict(flat)
    for p, shape in zip(resumed, SCALES_SHAPES):
        assert again.state[p]["exp_avg_sq_absmax"].shape == shape
    for step in range(3, 6):
        for optimizer, params in ((opt, straight), (again, resumed)):
            for p, g in zip(params, grads_for(params, step)):
                p.grad = g
            optimizer.step()
    for a, b in zip(straight, resumed):
        assert torch.equal(a.detach(), b.detach())


def train(opt_factory, params, steps, start=0):
    opt = opt_factory(params)
    for step in range(start, start + steps):
        for p, g in zip(params, grads_for(params, step)):
            p.grad = g
        opt.step()
    return opt


def test_resume_is_bit_for_bit():
    factory = lambda ps: FusedAdamW(ps, moment_dtype="8bit", amsgrad=True, **KW)   # noqa: E731
    straight = make_params()
    train(factory, straight, 6)
    resumed = make_params()
    first = train(factory, resumed, 3)
    saved = copy.deepcopy(first.state_dict())
    second = factory(resumed)
    second.load_state_dict(saved)
    for step in range(3, 6):
        for p, g in zip(resumed, grads_for(resumed, step)):
            p.grad = g
        second.step()
    for a, b in zip(straight, resumed):
        assert torch.equal(a.detach(), b.detach())


def test_torch_checkpoints_load_both_ways():
    # torch.optim.AdamW -> 8-bit: the moments quantized by the op's encoder.
    torch_params = make_params()
    torch_opt = train(lambda ps: torch.optim.AdamW(ps, **KW), torch_params, 3)
    eight_params = [torch.nn.Parameter(p.detach().clone()) for p in torch_params]
    eight = FusedAdamW(eight_params, moment_dtype="8bit", **KW)
    eight.load_state_dict(copy.deepcopy(torch_opt.state_dict()))   # (as torch.load would: no shared tensors)
    for a, b in zip(eight_params, torch_params):
        for key in ("exp_avg", "exp_avg_sq"):
            expected = quantize_moment(a, key, torch_opt.state[b][key])
            for name in QUANTIZED_KEYS[key]:
                assert torch.equal(eight.state[a][name], expected[name])
            assert key not in eight.state[a]
    # 8-bit -> torch.optim.AdamW: the moments decoded (exactly what the next step decodes).
    back_params = [torch.nn.Parameter(p.detach().clone()) for p in eight_params]
    back = torch.optim.AdamW(back_params, **KW)
    back.load_state_dict(copy.deepcopy(noam_ext.dequantized_state_dict(eight.state_dict())))
    for a, b in zip(eight_params, back_params):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(back.state[b][key], dequantize_moment(a, key, eight.state[a]))
    # Both continue: the torch run from the decoded moments, the 8-bit run from its codes; the
    # first step uses the same moments, so the parameters agree to float32 parity (1e-6).
    for p, q, g in zip(eight_params, back_params, grads_for(eight_params, 3)):
        p.grad, q.grad = g, g.clone()
    eight.step()
    back.step()
    for a, b in zip(eight_params, back_params):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)


def test_8bit_checkpoint_loads_into_float_moment_optimizers():
    params = make_params()
    eight = train(lambda ps: FusedAdamW(ps, moment_dtype="8bit", **KW), params, 3)
    other = FusedAdamW([torch.nn.Parameter(p.detach().clone()) for p in params], moment_dtype=torch.bfloat16, **KW)
    other.load_state_dict(copy.deepcopy(eight.state_dict()))
    for a, b in zip(params, all_params(other)):
        assert other.state[b]["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(other.state[b]["exp_avg"], dequantize_moment(a, "exp_avg", eight.state[a]).bfloat16())
        assert "exp_avg_codes" not in other.state[b]


def bnb_entry(shape, block, generator, small=False):
    """A bitsandbytes AdamW8bit state entry (Optimizer2State's keys)."""
    n = math.prod(shape)
    if small:
        return {"step": 7, "state1": torch.randn(shape, generator=generator),
                "state2": torch.rand(shape, generator=generator)}
    signed, unsigned = bnb_maps()
    blocks = -(-n // block)
    return {"step": 7,
            "state1": torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8),
            "state2": torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8),
            "qmap1": signed, "qmap2": unsigned,
            "absmax1": torch.rand(blocks, generator=generator), "absmax2": torch.rand(blocks, generator=generator)}


def bnb_decode(entry, index, block):
    codes, qmap, absmax = entry[f"state{index}"], entry[f"qmap{index}"], entry[f"absmax{index}"]
    flat = qmap[codes.reshape(-1).long()] * absmax.repeat_interleave(block)[:codes.numel()]
    return flat.reshape(codes.shape)


@pytest.mark.parametrize("block", [256, 2048])
def test_bitsandbytes_checkpoint_converts_by_copying_codes(block):
    generator = torch.Generator().manual_seed(0)
    shapes = [(3000,), (64, 70), (10,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]
    entries = [bnb_entry((3000,), block, generator), bnb_entry((64, 70), block, generator),
               bnb_entry((10,), block, generator, small=True)]
    saved = {"state": dict(enumerate(entries)),
             "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01,
                               "amsgrad": False, "optim_bits": 8, "min_8bit_size": 4096, "params": [0, 1, 2]}]}
    opt = FusedAdamW(params, moment_dtype="8bit", **KW)
    opt.load_state_dict(saved)
    for p, entry in zip(params[:2], entries[:2]):
        for index, key in ((1, "exp_avg"), (2, "exp_avg_sq")):
            # The codes are copied; each moment decodes to bitsandbytes' value within 2 ulps.
            assert torch.equal(opt.state[p][QUANTIZED_KEYS[key][0]], entry[f"state{index}"])
            torch.testing.assert_close(dequantize_moment(p, key, opt.state[p]), bnb_decode(entry, index, block),
                                       rtol=2.5e-7, atol=0)
    small = opt.state[params[2]]   # float32 moments of a small tensor: quantized (one rounding)
    assert torch.equal(small["exp_avg_codes"], quantize_moment(params[2], "exp_avg", entries[2]["state1"])["exp_avg_codes"])
    assert float(small["step"]) == 7.0
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()   # and it continues
    assert float(opt.state[params[0]]["step"]) == 8.0


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.complex64])
def test_unsupported_parameters_are_refused_by_name(dtype):
    good = torch.nn.Parameter(torch.randn(4))
    bad = torch.nn.Parameter(torch.randn(3, 2).to(dtype))
    with pytest.raises(ValueError, match=r"parameter 1 of param group 0 \(shape \(3, 2\)\)"):
        FusedAdamW([good, bad], moment_dtype="8bit")


def test_stochastic_rounding_needs_something_in_bfloat16():
    with pytest.raises(ValueError, match="stores nothing in bfloat16"):
        FusedAdamW([torch.nn.Parameter(torch.randn(4))], moment_dtype="8bit", stochastic_rounding=True)


def test_invalid_moment_dtype_names_the_argument():
    with pytest.raises(ValueError, match="Invalid moment_dtype: '4bit'"):
        FusedAdamW([torch.nn.Parameter(torch.randn(4))], moment_dtype="4bit")


def test_misshapen_checkpoint_changes_nothing():
    params = make_params(sizes=[(300,)])
    opt = train(lambda ps: FusedAdamW(ps, moment_dtype="8bit", **KW), params, 2)
    saved = copy.deepcopy(opt.state_dict())   # (state_dict() shares the live state's dicts, as torch's)
    before = copy.deepcopy(opt.state_dict())
    saved["state"][0]["exp_avg_absmax"] = torch.zeros(3)
    with pytest.raises(ValueError, match="'exp_avg_absmax' of parameter 0 of param group 0"):
        opt.load_state_dict(saved)
    for key, value in before["state"][0].items():
        assert torch.equal(opt.state[params[0]][key], value)


def test_a_loaded_moment_in_both_forms_takes_the_form_this_optimizer_does_not_keep():
    """torch.distributed.checkpoint's set_optimizer_state_dict(full_state_dict=True) fills the
    optimizer's own state with a checkpoint and adds the checkpoint's other keys: a moment saved
    in the other form arrives beside this optimizer's stale one. The other form is the
    checkpoint's and wins, both ways (float moments into an 8-bit optimizer, codes into a float
    one), as a plain load of the checkpoint gives."""
    factory = lambda ps: FusedAdamW(ps, moment_dtype="8bit", **KW)   # noqa: E731
    floats = lambda ps: FusedAdamW(ps, **KW)   # noqa: E731
    params = make_params(sizes=[(300,)])
    eight_sd = copy.deepcopy(train(factory, params, 2).state_dict())
    float_sd = copy.deepcopy(train(floats, make_params(sizes=[(300,)]), 2).state_dict())
    stale_codes = {"exp_avg_codes": torch.zeros(300, dtype=torch.uint8), "exp_avg_absmax": torch.zeros(2),
                   "exp_avg_sq_codes": torch.zeros(300, dtype=torch.uint8), "exp_avg_sq_absmax": torch.zeros(2)}
    stale_floats = {"exp_avg": torch.zeros(300), "exp_avg_sq": torch.zeros(300)}
    for optimizer, saved, stale in ((factory, float_sd, stale_codes), (floats, eight_sd, stale_floats)):
        merged = copy.deepcopy(saved)
        merged["state"][0].update(stale)
        plain, both = optimizer(make_params(sizes=[(300,)])), optimizer(make_params(sizes=[(300,)]))
        plain.load_state_dict(copy.deepcopy(saved))
        both.load_state_dict(merged)
        expected, got = next(iter(plain.state.values())), next(iter(both.state.values()))
        assert sorted(got) == sorted(expected)
        for key, value in expected.items():
            assert torch.equal(got[key], value), key


def test_a_plain_parameter_of_an_8bit_group_needs_codes_not_float_moments():
    """Only a DTensor shard that would cut a block steps with float moments in an 8-bit group
    (docs/eight_bit_state.md); a plain parameter whose state lost its codes is an error that
    names the missing key, before anything changes (as torch's KeyError on a missing moment)."""
    p = torch.nn.Parameter(torch.randn(300))
    opt = FusedAdamW([p], moment_dtype="8bit", **KW)
    opt.state[p] = {"step": torch.zeros(()), "exp_avg": torch.zeros(300), "exp_avg_sq": torch.zeros(300)}
    p.grad = torch.randn(300)
    before = p.detach().clone()
    with pytest.raises(KeyError, match="has no 'exp_avg_codes'"):
        opt.step()
    assert torch.equal(p.detach(), before) and float(opt.state[p]["step"]) == 0.0


def test_a_misshapen_moment_is_refused_where_the_group_does_not_use_it():
    # The load converts every moment present (settle_moments), so every one is checked first.
    params = make_params(sizes=[(300,)])
    opt = train(lambda ps: FusedAdamW(ps, moment_dtype="8bit", **KW), params, 2)
    saved = copy.deepcopy(opt.state_dict())
    before = copy.deepcopy(opt.state_dict())
    saved["state"][0]["max_exp_avg_sq"] = torch.zeros(7)
    with pytest.raises(ValueError, match="'max_exp_avg_sq' of parameter 0 of param group 0"):
        opt.load_state_dict(saved)
    assert sorted(opt.state[params[0]]) == sorted(before["state"][0])
    for key, value in before["state"][0].items():
        assert torch.equal(opt.state[params[0]][key], value)


@pytest.mark.parametrize("scales, message", [
    (None, "moment_absmax must have one scale tensor per 8-bit moment"),
    ([torch.zeros(2), torch.zeros(1)], "needs its scales .exp_avg_sq_absmax. as a contiguous float32 tensor of 2"),
    ([torch.zeros(2), torch.zeros(2, dtype=torch.float64)], "got Double"),
])
def test_op_refuses_missing_or_misshapen_scales_before_writing(scales, message):
    p = torch.randn(300)
    before = p.clone()
    hyper = torch.zeros(1, _C.table_layout()["num_hyper_columns"], dtype=torch.float64)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.noam_ext.fused_adamw_([p], [torch.randn(300)], [torch.zeros(300, dtype=torch.uint8)],
                                        [torch.zeros(300, dtype=torch.uint8)], [],
                                        [torch.zeros((), dtype=torch.float32)], torch.zeros(1, dtype=torch.int64),
                                        hyper, [0], moment_absmax=scales)
    assert torch.equal(p, before)


def test_op_refuses_a_shard_offset_inside_a_block_before_writing():
    # A block's elements share stochastic rounding's keys only when the shard starts on a block.
    p, g = torch.randn(300).to(torch.bfloat16), torch.randn(300).to(torch.bfloat16)
    before = p.clone()
    hyper = torch.zeros(1, _C.table_layout()["num_hyper_columns"], dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"element_offsets\[0\] is 100: with 8-bit moments it must be a multiple"):
        torch.ops.noam_ext.fused_adamw_([p], [g], [torch.zeros(300, dtype=torch.uint8)],
                                        [torch.zeros(300, dtype=torch.uint8)], [],
                                        [torch.zeros((), dtype=torch.float32)], torch.zeros(1, dtype=torch.int64),
                                        hyper, [0], moment_absmax=[torch.zeros(2), torch.zeros(2)],
                                        stochastic_rounding=True, rng_streams=[1], element_offsets=[100])
    assert torch.equal(p, before)


def test_bitsandbytes_non_blockwise_and_malformed_entries():
    generator = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(600, generator=generator))
    signed, unsigned = bnb_maps()
    codes = torch.randint(0, 256, (600,), generator=generator, dtype=torch.uint8)
    entry = {"step": 3, "state1": codes, "state2": codes.clone(), "qmap1": signed, "qmap2": unsigned,
             "max1": torch.tensor([0.5]), "max2": torch.tensor([0.25]), "new_max1": torch.tensor([0.5]),
             "new_max2": torch.tensor([0.25])}
    group = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "params": [0]}
    opt = FusedAdamW([p], moment_dtype="8bit")
    opt.load_state_dict({"state": {0: entry}, "param_groups": [group]})
    decoded = signed[codes.long()] * 0.5   # one max for the whole tensor: decoded, then quantized
    expected = quantize_moment(p, "exp_avg", decoded)
    assert torch.equal(opt.state[p]["exp_avg_codes"], expected["exp_avg_codes"])
    bad = {k: v for k, v in entry.items() if k not in ("max1", "max2")}
    fresh = FusedAdamW([torch.nn.Parameter(torch.randn(600))], moment_dtype="8bit")
    with pytest.raises(ValueError, match="saved as 0 has no 'qmap1' and 'absmax1'"):
        fresh.load_state_dict({"state": {0: bad}, "param_groups": [group]})
    assert not fresh.state

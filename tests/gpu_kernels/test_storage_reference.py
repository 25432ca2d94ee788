"""Every storage against an independent reference: AdamW in float64 Python, as docs/adamw.md writes it,
then each value rounded as the docs say it is stored.

The other storage tests compare the CUDA kernels (on a GPU, or their host run) with the CPU op,
and all of them share one math header: a mistake there would agree with itself. Here the
reference shares nothing with the C++ but the documented rules:
  - the update: g = grad / scale * clip (negated with maximize); p *= 1 - lr*wd;
    m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; vmax = max(vmax, v) with amsgrad;
    p -= lr / (1 - b1^t) * m / (sqrt(v or vmax) / sqrt(1 - b2^t) + eps);
  - float32 values: the float32 math's rounding only (a few float32 ulps of the terms);
  - bfloat16 values rounded to nearest: within half a bfloat16 ulp, plus that float32 error,
    and equal to the reference rounded to nearest except at near-ties;
  - a float32 master: its bfloat16 parameter is the master rounded to nearest, ties away
    from zero; an int16 remainder: (parameter bits << 16) + remainder is that float32 master;
  - stochastic rounding: one of the two bfloat16 values around the exact result, up with
    probability (the dropped bits) / 2**16: unbiased over many elements, and not nearest.
State is compared after each of several steps; each step's reference starts from what the
op stored, so that the error is one step's. Run on the CPU op, the host run of the CUDA
kernels, and a GPU where one is present.
"""

from __future__ import annotations

import pytest
import torch

import host_run
import storage_cases
from noam_ext._hyper import BETA1, BETA2, EPS, LR, MAXIMIZE, NUM_HYPER_COLUMNS, WEIGHT_DECAY

STEPS = 4
NUMELS = [4097, 300, 5]
HYPER = dict(lr=3e-3, beta1=0.9, beta2=0.98, eps=1e-8, weight_decay=0.1)
RUNNERS = ["cpu op", "host run", pytest.param("cuda", marks=pytest.mark.cuda)]
# (8-bit moments have a float64 reference of their own: low_bytes/test_eight_bit.py.)
CASES = [(s, amsgrad, rounded) for s in storage_cases.STORAGES if s[0] != "float64" and s[2] != "8bit"
         for amsgrad in (False, True) for rounded in ((False, True) if storage_cases.can_round(s) else (False,))]


def hyper_table(maximize: bool) -> torch.Tensor:
    hyper = torch.zeros(1, NUM_HYPER_COLUMNS, dtype=torch.float64)   # no schedule: lr as given
    hyper[0, LR], hyper[0, BETA1], hyper[0, BETA2] = HYPER["lr"], HYPER["beta1"], HYPER["beta2"]
    hyper[0, EPS], hyper[0, WEIGHT_DECAY], hyper[0, MAXIMIZE] = HYPER["eps"], HYPER["weight_decay"], float(maximize)
    return hyper


def ulp(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The spacing of a float format with `bits` of precision at |x| (float64 in, float64 out)."""
    _, exponent = torch.frexp(x.abs().clamp_min(1e-30))
    return torch.ldexp(torch.ones_like(x), exponent - bits)


def bfloat16_around(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bfloat16 values just below and above each float64 value (equal where exact)."""
    nearest = x.to(torch.bfloat16).double()
    step = ulp(nearest, 8)
    below = torch.where(nearest > x, nearest - step, nearest)
    above = torch.where(nearest < x, nearest + step, nearest)
    return below, above


def half_away_bfloat16(master: torch.Tensor) -> torch.Tensor:
    """A float32 rounded to bfloat16, ties away from zero (the documented master rounding)."""
    bits = master.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = ((bits + 0x8000) & 0xFFFF0000).to(torch.int64)
    rounded = torch.where(rounded >= 2**31, rounded - 2**32, rounded).to(torch.int32)
    return rounded.view(torch.float32).to(torch.bfloat16)


def joined_master(param: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    """(bfloat16 bits << 16) + int16 remainder, as a float32."""
    bits = (param.view(torch.int16).to(torch.int64) & 0xFFFF) * 65536 + remainder.to(torch.int64)
    bits = bits & 0xFFFFFFFF
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    return bits.view(torch.float32)


def stored_param(args, i, master_kind) -> torch.Tensor:
    if master_kind == "float32":
        return args["masters"][i].double()
    if master_kind == "remainder":
        return joined_master(args["params"][i], args["masters"][i]).double()
    return args["params"][i].double()


def reference_step(p, g, m, v, vmax, step, amsgrad, maximize, scale, clip):
    """One documented AdamW step in float64: the new values, and the magnitudes of the terms
    each was summed from (what the float32 math's rounding error is relative to)."""
    g = g / scale * clip
    if maximize:
        g = -g
    m_old, v_old, vmax_old = m, v, vmax
    t = step + 1
    p = p * (1 - HYPER["lr"] * HYPER["weight_decay"])
    m = HYPER["beta1"] * m + (1 - HYPER["beta1"]) * g
    v = HYPER["beta2"] * v + (1 - HYPER["beta2"]) * g * g
    second = v
    if amsgrad:
        vmax = torch.maximum(vmax, v)
        second = vmax
    denom = second.sqrt() / (1 - HYPER["beta2"] ** t) ** 0.5 + HYPER["eps"]
    update = HYPER["lr"] / (1 - HYPER["beta1"] ** t) * m / denom
    sizes = dict(p=p.abs() + update.abs(), m=(HYPER["beta1"] * m_old).abs() + ((1 - HYPER["beta1"]) * g).abs(),
                 v=HYPER["beta2"] * v_old + (1 - HYPER["beta2"]) * g * g)
    sizes["vmax"] = torch.maximum(sizes["v"], vmax_old) if amsgrad else None
    return p - update, m, v, vmax, sizes


def run(runner, args):
    options = dict(args["options"])
    if runner == "cpu op":
        torch.ops.noam_ext.fused_adamw_(*storage_cases.positional(args), **options)
    elif runner == "host run":
        host_run.ops().fused_adamw_(*storage_cases.positional(args), multiprocessors=2, **options)
    else:
        torch.ops.noam_ext.fused_adamw_(*storage_cases.positional(args), **options)
        torch.cuda.synchronize()


class Checker:
    """Compares a stored tensor with the float64 reference, by how the docs say it is stored."""

    def __init__(self):
        self.stochastic = []   # (stored - reference) / bfloat16 ulp, and whether it was the nearest value

    def float32(self, what, stored, ref, scale):
        tolerance = 8 * ulp(scale, 24)
        bad = (stored.double() - ref).abs() > tolerance
        assert not bad.any(), f"{what}: {int(bad.sum())} values beyond 8 float32 ulps of the reference"

    def nearest(self, what, stored, ref, scale):
        """bfloat16 or float16, rounded to nearest."""
        if stored.dtype == torch.bfloat16:
            spacing = ulp(ref, 8)
        else:   # float16: 11 bits, and subnormals below 2**-14 spaced 2**-24 apart
            spacing = ulp(ref, 11).clamp_min(2.0**-24)
        tolerance = 0.5 * spacing + 8 * ulp(scale, 24)
        nearest = ref.to(stored.dtype).double()
        stored = stored.double()
        bad = (stored - ref).abs() > tolerance
        assert not bad.any(), f"{what}: {int(bad.sum())} values beyond half an ulp of the reference"
        same = (stored == nearest).double().mean().item()
        assert same >= 0.98, f"{what}: only {same:.1%} equal the reference rounded to nearest"

    def stochastic_bfloat16(self, what, stored, ref, scale):
        tolerance = 8 * ulp(scale, 24)
        below, _ = bfloat16_around(ref - tolerance)
        _, above = bfloat16_around(ref + tolerance)
        stored = stored.double()
        bad = (stored < below) | (stored > above)
        assert not bad.any(), f"{what}: {int(bad.sum())} values are not one of the bfloat16 values around the result"
        inexact = ref.to(torch.bfloat16).double() != ref
        self.stochastic.append(((stored - ref)[inexact] / ulp(ref[inexact], 8),
                                (stored == ref.to(torch.bfloat16).double())[inexact]))

    def assert_stochastic_rounding_is_unbiased_and_not_nearest(self):
        errors = torch.cat([e for e, _ in self.stochastic])
        nearest = torch.cat([n for _, n in self.stochastic]).double().mean().item()
        assert errors.numel() > 5000
        # One rounding's error is within one ulp, mean 0 and standard deviation at most 0.5 ulp:
        # the mean of n of them stays within 6 standard deviations of 0.
        assert abs(errors.mean().item()) < 6 * 0.5 / errors.numel() ** 0.5, errors.mean().item()
        assert 0.5 < nearest < 0.95, f"{nearest:.1%} rounded to nearest: not stochastic"


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("storage,amsgrad,rounded", CASES,
                         ids=[f"{storage_cases.storage_id(s)}-{'amsgrad' if a else 'adamw'}{'-rounded' if r else ''}"
                              for s, a, r in CASES])
def test_each_step_matches_the_documented_formulas(storage, amsgrad, rounded, runner):
    param_dtype, grad_dtype, moment_dtype, master = storage
    device = "cuda" if runner == "cuda" else "cpu"
    maximize = amsgrad   # both branches of maximize, on half the cases each
    args = storage_cases.make_call(storage, NUMELS, amsgrad, seed=21, stochastic=rounded)
    args["hyper"], args["groups"] = hyper_table(maximize), [0] * len(NUMELS)
    scale, clip = 512.0, 0.75
    args["options"].update(grad_scale=torch.tensor([scale]), found_inf=torch.tensor([0.0]),
                           grad_clip=torch.tensor([clip], dtype=torch.float64))
    for i, g in enumerate(args["grads"]):
        args["grads"][i] = (g.double() * scale).to(g.dtype)   # scaled gradients, as GradScaler leaves them
    args = storage_cases.on_device(args, device)
    checker = Checker()
    rounds_param = rounded and param_dtype == "bfloat16" and master == "none"
    rounds_moments = rounded and moment_dtype == "bfloat16"
    for step in range(STEPS):
        before = [dict(p=stored_param(args, i, master), g=args["grads"][i].double(), m=args["exp_avgs"][i].double(),
                       v=args["exp_avg_sqs"][i].double(),
                       vmax=args["max_exp_avg_sqs"][i].double() if amsgrad else None,
                       step=float(args["state_steps"][i])) for i in range(len(NUMELS))]
        run(runner, args)
        for i, b in enumerate(before):
            p, m, v, vmax, size = reference_step(b["p"], b["g"], b["m"], b["v"], b["vmax"], b["step"], amsgrad,
                                                 maximize, scale, clip)
            where = f"step {step + 1}, tensor {i}"
            assert float(args["state_steps"][i]) == b["step"] + 1
            moments = [("exp_avg", args["exp_avgs"][i], m, size["m"]), ("exp_avg_sq", args["exp_avg_sqs"][i], v, size["v"])]
            if amsgrad:
                moments.append(("max_exp_avg_sq", args["max_exp_avg_sqs"][i], vmax, size["vmax"]))
            for name, stored, ref, magnitude in moments:
                if moment_dtype == "float32":
                    checker.float32(f"{where}: {name}", stored.cpu(), ref.cpu(), magnitude.cpu())
                elif rounds_moments:
                    checker.stochastic_bfloat16(f"{where}: {name}", stored.cpu(), ref.cpu(), magnitude.cpu())
                else:
                    checker.nearest(f"{where}: {name}", stored.cpu(), ref.cpu(), magnitude.cpu())
            param = args["params"][i]
            if master == "float32":
                checker.float32(f"{where}: master", args["masters"][i].cpu(), p.cpu(), size["p"].cpu())
                expected = (half_away_bfloat16(args["masters"][i].cpu()) if param_dtype == "bfloat16"
                            else args["masters"][i].cpu().to(torch.float16))
                assert torch.equal(param.cpu(), expected), f"{where}: the parameter is not its master rounded"
            elif master == "remainder":
                joined = joined_master(param.cpu(), args["masters"][i].cpu())
                checker.float32(f"{where}: parameter and remainder", joined, p.cpu(), size["p"].cpu())
                assert torch.equal(param.cpu(), half_away_bfloat16(joined)), \
                    f"{where}: the parameter is not its master rounded, ties away from zero"
            elif param_dtype == "float32":
                checker.float32(f"{where}: parameter", param.cpu(), p.cpu(), size["p"].cpu())
            elif rounds_param:
                checker.stochastic_bfloat16(f"{where}: parameter", param.cpu(), p.cpu(), size["p"].cpu())
            else:
                checker.nearest(f"{where}: parameter", param.cpu(), p.cpu(), size["p"].cpu())
    if rounded:
        checker.assert_stochastic_rounding_is_unbiased_and_not_nearest()

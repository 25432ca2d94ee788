"""The noam_ext::fused_adamw_ op itself: registration (opcheck), argument checks,
GradScaler tensors, and identical results on every compiled CPU instruction set."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import noam_ext
from noam_ext._flat import AMSGRAD, BETA1, BETA2, EPS, LR, NUM_HYPER_COLUMNS, WEIGHT_DECAY, aligned_offsets


def op_args(numels=(5, 0, 130, 3), dtype=torch.float32, amsgrad=False, seed=0):
    """Arguments for one call: flat buffers with 64-byte aligned segments, two groups."""
    generator = torch.Generator().manual_seed(seed)
    offsets, length = aligned_offsets(list(numels), torch.tensor([], dtype=dtype).element_size())
    buf = lambda: torch.randn(length, generator=generator).to(dtype)  # noqa: E731
    param, grad, exp_avg = buf(), buf(), buf()
    exp_avg_sq = buf().abs()
    segments = torch.tensor([[o, n, i % 2] for i, (o, n) in enumerate(zip(offsets, numels))], dtype=torch.int64)
    hyper = torch.zeros(2, NUM_HYPER_COLUMNS, dtype=torch.float64)
    hyper[:, LR], hyper[:, BETA1], hyper[:, BETA2], hyper[:, EPS] = 1e-2, 0.9, 0.98, 1e-9
    hyper[0, WEIGHT_DECAY] = 0.01
    hyper[:, AMSGRAD] = float(amsgrad)
    return dict(param=param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                max_exp_avg_sq=exp_avg_sq.clone() if amsgrad else None,
                param_steps=torch.full((len(numels),), 3.0), schedule_step=torch.zeros(2, dtype=torch.int64),
                segments=segments, hyper=hyper, active=None)


def call(args, **kwargs):
    a = args
    torch.ops.noam_ext.fused_adamw_(a["param"], a["grad"], a["exp_avg"], a["exp_avg_sq"], a["max_exp_avg_sq"],
                                    a["param_steps"], a["schedule_step"], a["segments"], a["hyper"],
                                    a["active"], **kwargs)


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
def test_opcheck(amsgrad):
    a = op_args(amsgrad=amsgrad)
    args = (a["param"], a["grad"], a["exp_avg"], a["exp_avg_sq"], a["max_exp_avg_sq"], a["param_steps"],
            a["schedule_step"], a["segments"], a["hyper"], a["active"])
    torch.library.opcheck(torch.ops.noam_ext.fused_adamw_.default, args)


def test_padding_and_inactive_segments_are_not_touched():
    a = op_args()
    a["active"] = torch.tensor([True, True, False, True])
    before = {k: v.clone() for k, v in a.items() if isinstance(v, torch.Tensor)}
    call(a)
    seg = a["segments"]
    covered = torch.zeros_like(a["param"], dtype=torch.bool)
    for i, (offset, numel, _) in enumerate(seg.tolist()):
        if a["active"][i]:
            covered[offset:offset + numel] = True
    assert torch.equal(a["param"][~covered], before["param"][~covered])
    assert not torch.equal(a["param"][covered], before["param"][covered])
    assert a["param_steps"].tolist() == [4.0, 4.0, 3.0, 4.0]
    assert a["schedule_step"].tolist() == [1, 0]


def test_found_inf_skips_everything_but_the_schedule():
    a = op_args()
    before = {k: v.clone() for k, v in a.items() if isinstance(v, torch.Tensor)}
    call(a, grad_scale=torch.tensor([1024.0]), found_inf=torch.tensor([1.0]))
    for key in ("param", "exp_avg", "exp_avg_sq", "param_steps"):
        assert torch.equal(a[key], before[key]), key
    assert a["schedule_step"].tolist() == [1, 0]


def test_grad_scale_divides_the_gradient():
    scaled, plain = op_args(seed=1), op_args(seed=1)
    scaled["grad"] = scaled["grad"] * 256.0
    call(scaled, grad_scale=torch.tensor([256.0]), found_inf=torch.tensor([0.0]))
    call(plain)
    assert torch.equal(scaled["param"], plain["param"])


@pytest.mark.parametrize("mutate, message", [
    (lambda a: a.update(grad=a["grad"].double()), "grad has dtype"),
    (lambda a: a.update(exp_avg=a["exp_avg"][:-1]), "exp_avg has"),
    (lambda a: a.update(param_steps=a["param_steps"].double()), "param_steps"),
    (lambda a: a["segments"].__setitem__((2, 1), 10**6), "segment 2"),
    (lambda a: a["segments"].__setitem__((1, 2), 7), "names group 7"),
    (lambda a: a.update(hyper=a["hyper"][:, :5].contiguous()), "hyper"),
    (lambda a: a["hyper"].__setitem__((0, AMSGRAD), 1.0), "amsgrad"),
    (lambda a: a.update(param=a["param"].to(torch.int32)), "param must be float"),
], ids=["grad-dtype", "short-buffer", "steps-dtype", "segment-out-of-range", "bad-group",
        "hyper-shape", "amsgrad-without-buffer", "int-param"])
def test_bad_arguments_are_rejected_before_anything_changes(mutate, message):
    a = op_args()
    mutate(a)
    before = {k: v.clone() for k, v in a.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(RuntimeError, match=message):
        call(a)
    for key, value in before.items():
        assert torch.equal(a[key], value), key


SCRIPT = r"""
import json, sys, torch, noam_ext
sys.path.insert(0, {tests!r})
from test_op import op_args, call
out = {{"capability": noam_ext.cpu_capability()}}
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    for amsgrad in (False, True):
        a = op_args(numels=(1, 3, 4, 5, 4097, 31, 64, 0, 17), dtype=dtype, amsgrad=amsgrad, seed=7)
        for _ in range(3):
            call(a)
        out[f"{{dtype}}-{{amsgrad}}"] = [a[k].double().tolist() for k in ("param", "exp_avg", "exp_avg_sq")]
print(json.dumps(out))
"""


def test_every_compiled_instruction_set_gives_identical_bits():
    compiled = noam_ext.build_info()["cpu_capabilities_compiled"]
    results = {}
    for capability in compiled:
        env = dict(os.environ, NOAM_EXT_CPU_CAPABILITY=capability)
        script = SCRIPT.format(tests=os.path.dirname(__file__))
        run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                             cwd=os.path.dirname(__file__), check=True)
        results[capability] = json.loads(run.stdout)
    ran = {r.pop("capability") for r in results.values()}
    # A capability the CPU lacks is lowered to one it has; the best one must have run.
    assert {"default", noam_ext.cpu_capability()} <= ran
    baseline = results["default"]
    for capability, result in results.items():
        assert result == baseline, f"{capability} differs from the portable build"

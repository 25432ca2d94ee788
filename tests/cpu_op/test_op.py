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
import host_run
from op_args import clone, make_args, positional, tensors_of


def call(args, **kwargs):
    torch.ops.noam_ext.fused_adamw_(*positional(args), **kwargs)


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
def test_opcheck(amsgrad):
    a = make_args([5, 0, 130, 3], amsgrad=amsgrad)
    torch.library.opcheck(torch.ops.noam_ext.fused_adamw_.default, positional(a),
                          {"advance_schedule": True, "grad_scale": torch.tensor([2.0]),
                           "found_inf": torch.tensor([0.0]), "grad_clip": torch.tensor([0.5], dtype=torch.float64)})


def test_every_tensor_is_updated_and_counted():
    a = make_args([5, 0, 130, 3])
    before = clone(a)
    call(a)
    for i in (0, 2, 3):
        assert not torch.equal(a["params"][i], before["params"][i])
    assert [float(s) for s in a["state_steps"]] == [1.0, 2.0, 3.0, 4.0]
    assert a["schedule_step"].tolist() == [6]


def test_found_inf_skips_everything_but_the_schedule():
    a = make_args([5, 7])
    before = clone(a)
    call(a, grad_scale=torch.tensor([1024.0]), found_inf=torch.tensor([1.0]))
    for (name, expected), (_, actual) in zip(tensors_of(before), tensors_of(a)):
        if name != "schedule_step":
            assert torch.equal(actual, expected), name
    assert a["schedule_step"].tolist() == [6]


def test_grad_scale_divides_the_gradient():
    scaled, plain = make_args([5, 33], seed=1), make_args([5, 33], seed=1)
    scaled["grads"] = [g * 256.0 for g in scaled["grads"]]
    call(scaled, grad_scale=torch.tensor([256.0]), found_inf=torch.tensor([0.0]))
    call(plain)
    for a, b in zip(scaled["params"], plain["params"]):
        assert torch.equal(a, b)


def test_grad_clip_multiplies_the_unscaled_gradient():
    clipped, plain = make_args([5, 33], seed=2), make_args([5, 33], seed=2)
    plain["grads"] = [g * 0.125 for g in plain["grads"]]   # powers of two: every product is exact
    call(clipped, grad_scale=torch.tensor([4.0]), grad_clip=torch.tensor([0.5], dtype=torch.float64))
    call(plain)   # (g / 4) * 0.5 == g * 0.125
    for a, b in zip(clipped["params"], plain["params"]):
        assert torch.equal(a, b)


def _set(key, i, value):
    return lambda a: a[key].__setitem__(i, value(a[key][i]))


@pytest.mark.parametrize("mutate, message", [
    (_set("grads", 1, lambda t: t.double()), r"gradient of params\[1\] has dtype"),
    (_set("exp_avgs", 2, lambda t: t[:-1]), r"exp_avg of params\[2\] has shape"),
    (_set("state_steps", 0, lambda t: t.double()), r"step of params\[0\]"),
    (_set("params", 3, lambda t: t.to(torch.int32)), r"params\[3\] has dtype Int but this call.s parameters have Float"),
    (_set("grads", 2, lambda t: t.to_sparse()), "SparseCPU"),   # the dispatcher refuses it
    (_set("exp_avg_sqs", 2, lambda t: t.reshape(10, 13).t()), r"exp_avg_sq of params\[2\] has shape"),
    (lambda a: a["groups"].__setitem__(1, 7), r"params\[1\] names hyperparameter row 7"),
    (lambda a: a.update(hyper=a["hyper"][:, :5].contiguous()), "hyper"),
    (lambda a: a["grads"].pop(), "same length"),
    (lambda a: a["params"].__setitem__(3, a["params"][0][:3]), r"params\[0\] and params\[3\] share memory"),
], ids=["grad-dtype", "short-moment", "step-dtype", "int-param", "sparse-grad", "transposed-moment",
        "bad-group", "hyper-shape", "short-list", "shared-memory"])
def test_bad_arguments_are_rejected_before_anything_changes(mutate, message):
    a = make_args([5, 0, 130, 3])
    mutate(a)
    before = clone(a)
    with pytest.raises(RuntimeError, match=message):
        call(a)
    for (name, expected), (_, actual) in zip(tensors_of(before), tensors_of(a)):
        assert torch.equal(actual.to_dense() if actual.is_sparse else actual,
                           expected.to_dense() if expected.is_sparse else expected), name


def test_non_contiguous_but_dense_tensors_are_updated_like_contiguous_ones():
    # A transposed (column-major) parameter with gradient and moments of the same
    # strides: the op walks memory, so the result equals the contiguous case.
    a = make_args([12])
    b = clone(a)
    for key in ("params", "grads", "exp_avgs", "exp_avg_sqs"):
        a[key] = [a[key][0].reshape(4, 3).t()]
        b[key] = [b[key][0].reshape(4, 3)]
    call(a)
    call(b)
    assert torch.equal(a["params"][0].t(), b["params"][0])


SCRIPT = r"""
import json, sys, torch, noam_ext
sys.path.insert(0, {tests!r})
from op_args import make_args, positional
out = {{"capability": noam_ext.cpu_capability()}}
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    for amsgrad in (False, True):
        a = make_args((1, 3, 4, 5, 4097, 31, 64, 0, 17), dtype=dtype, amsgrad=amsgrad, seed=7, misaligned_every=4)
        for _ in range(3):
            torch.ops.noam_ext.fused_adamw_(*positional(a))
        out[f"{{dtype}}-{{amsgrad}}"] = [[t.double().tolist() for t in a[k]] for k in ("params", "exp_avgs", "exp_avg_sqs")]
print(json.dumps(out))
"""


def test_every_compiled_instruction_set_gives_identical_bits():
    compiled = noam_ext.build_info()["cpu_capabilities_compiled"]
    results = {}
    for capability in compiled:
        env = dict(os.environ, NOAM_EXT_CPU_CAPABILITY=capability)
        script = SCRIPT.format(tests=os.path.dirname(os.path.dirname(__file__)))   # op_args lives in tests/
        run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                             cwd=os.path.dirname(__file__), check=True)
        results[capability] = json.loads(run.stdout)
    ran = {r.pop("capability") for r in results.values()}
    # A capability the CPU lacks is lowered to one it has; the best one must have run.
    assert {"default", noam_ext.cpu_capability()} <= ran
    baseline = results["default"]
    for capability, result in results.items():
        assert result == baseline, f"{capability} differs from the portable build"


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
def test_opcheck_emulation(amsgrad):
    a = make_args([5, 0, 4097, 3], amsgrad=amsgrad, misaligned_every=2)
    torch.library.opcheck(host_run.ops().fused_adamw_.default, positional(a),
                          {"num_blocks": 3, "threads_per_block": 32, "advance_schedule": False,
                           "grad_scale": torch.tensor([4.0]), "found_inf": torch.tensor([0.0])})


def test_opcheck_row_walk():
    torch.library.opcheck(host_run.ops().row_walk.default, ([5, 0, 40000, 3], 16, 40040))

"""noam_ext::grad_norm, the CPU global-norm op behind FusedAdamW.clip_grad_norm_:
values against torch.linalg.vector_norm in float64, inf/NaN propagation, chunk
boundaries inside tensors, layouts, results independent of the thread count and
of the instruction set, registration (opcheck) and argument errors.

Tolerances. The op widens every element to float64: squares of float32, bfloat16
and float16 values are then exact and only the additions round (a float64 square
rounds once more). It sums each 65536-element chunk in 16 lanes of <= 4096
additions, the lanes pairwise and the chunks in order, so its sum is within
about (4096 + 4 + chunks) * 2**-53 of the exact one, relatively (all terms are
positive); the float64 reference is as close or closer, and the square root
halves both. With the few chunks here that is < 1e-12, whatever the gradients'
dtype. The inf-norm is a maximum, exact: compared for equality."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import noam_ext

op = torch.ops.noam_ext.grad_norm
INF = float("inf")
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
IDS = ["float32", "float64", "bfloat16", "float16"]
# Odd sizes, so that the 65536-element chunks end inside tensors; empty, 0-dim and
# single-element tensors between them.
SIZES = [(3,), (65537,), (), (0,), (17, 1001), (1,), (131071,), (5, 0), (2, 3, 4099), (65536,)]


def make_grads(dtype, sizes=SIZES, seed=0, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(s, generator=generator, dtype=torch.float64)).to(dtype) for s in sizes]


def reference(grads, norm_type):
    flat = torch.cat([g.double().reshape(-1) for g in grads]) if grads else torch.zeros(0, dtype=torch.float64)
    return torch.linalg.vector_norm(flat, norm_type)


@pytest.mark.parametrize("norm_type", [2.0, INF], ids=["l2", "inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_matches_vector_norm_in_float64(dtype, norm_type):
    grads = make_grads(dtype)
    norm = op(grads, norm_type)
    assert norm.dtype == torch.float64 and norm.shape == () and norm.device.type == "cpu"
    torch.testing.assert_close(norm, reference(grads, norm_type), rtol=1e-12 if norm_type == 2.0 else 0, atol=0)


def test_mixed_dtypes_in_one_call():
    grads = [g for dtype in DTYPES for g in make_grads(dtype, SIZES[:4], seed=len(str(dtype)))]
    for norm_type in (2.0, INF):
        torch.testing.assert_close(op(grads, norm_type), reference(grads, norm_type),
                                   rtol=1e-12 if norm_type == 2.0 else 0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_nan_and_inf_propagate_like_torch(dtype):
    for values, expected in (([float("nan")], "nan"), ([INF], "inf"), ([-INF], "inf"),
                             ([INF, float("nan")], "nan"), ([float("nan"), -INF], "nan")):
        for where in (0, 6, 8):   # the first tensor, one ending in a later chunk, the last
            grads = make_grads(dtype)
            flat = grads[where].view(-1)
            for k, v in enumerate(values):
                flat[(len(flat) - 1 - 7 * k) % len(flat)] = v
            for norm_type in (2.0, INF):
                norm = float(op(grads, norm_type))
                # (torch's inf-norm refuses empty tensors, which the op takes as norm 0)
                torch_norm = float(torch.nn.utils.get_total_norm([g for g in grads if g.numel()], norm_type))
                assert str(norm) == str(torch_norm) == expected, (values, where, norm_type)


def test_large_finite_values_do_not_overflow_float16_or_the_sum():
    # float16's largest value squared overflows float16 and float32's overflows
    # float32 (not float64): the op squares in float64.
    for dtype in (torch.float16, torch.float32):
        big = torch.full((1000,), torch.finfo(dtype).max, dtype=dtype)
        torch.testing.assert_close(op([big], 2.0), reference([big], 2.0), rtol=1e-12, atol=0)


def test_empty_lists_and_empty_tensors_have_norm_zero():
    for grads in ([], [torch.zeros(0)], [torch.zeros(0, 3), torch.zeros((), dtype=torch.float64)[None][:0]]):
        for norm_type in (2.0, INF):
            norm = op(grads, norm_type)
            assert norm.dtype == torch.float64 and norm.device.type == "cpu" and float(norm) == 0.0


def test_non_contiguous_gradients():
    base = make_grads(torch.float32, [(300, 257), (64, 3, 5), (1001,)])
    grads = [base[0].t(),                        # transposed: dense, read in memory order
             base[1].permute(2, 0, 1),           # permuted: dense
             base[0][::3, 1:],                   # strided slice: not dense, read from a copy
             base[2][::2],
             base[2][:7].expand(4, 7)]           # overlapping (stride 0): each element 4 times
    for norm_type in (2.0, INF):
        torch.testing.assert_close(op(grads, norm_type), reference(grads, norm_type),
                                   rtol=1e-12 if norm_type == 2.0 else 0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_same_bits_for_any_number_of_threads(dtype):
    grads = make_grads(dtype, SIZES * 4, seed=3)    # ~1.3e6 elements: 20 chunks
    threads = torch.get_num_threads()
    try:
        results = {}
        for n in (1, 2, 3, 7):
            torch.set_num_threads(n)
            results[n] = [op(grads, norm_type) for norm_type in (2.0, INF)]
    finally:
        torch.set_num_threads(threads)
    for n, result in results.items():
        assert all(torch.equal(a, b) for a, b in zip(result, results[1])), f"{n} threads differ from 1"


SCRIPT = """
import json, sys
import torch, noam_ext
sys.path.insert(0, {tests!r})
from test_grad_norm import DTYPES, SIZES, make_grads, op
grads = [g for dtype in DTYPES for g in make_grads(dtype, SIZES * 2)]
print(json.dumps({{"capability": noam_ext.cpu_capability(),
                   "norms": [op(grads, p).item().hex() for p in (2.0, float("inf"))]}}))
"""


def test_every_compiled_instruction_set_gives_identical_bits():
    results = {}
    for capability in noam_ext.build_info()["cpu_capabilities_compiled"]:
        env = dict(os.environ, NOAM_EXT_CPU_CAPABILITY=capability)
        run = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=os.path.dirname(__file__))], env=env,
                             capture_output=True, text=True, cwd=os.path.dirname(__file__), check=True)
        results[capability] = json.loads(run.stdout)
    ran = {r.pop("capability") for r in results.values()}
    assert {"default", noam_ext.cpu_capability()} <= ran
    for capability, result in results.items():
        assert result == results["default"], f"{capability} differs from the portable build"


@pytest.mark.parametrize("norm_type", [2.0, INF], ids=["l2", "inf"])
def test_opcheck(norm_type):
    grads = make_grads(torch.float32, [(5,), (0,), (130, 3), ()]) + make_grads(torch.bfloat16, [(7,)])
    torch.library.opcheck(op.default, (grads, norm_type))


def test_opcheck_empty_list():
    torch.library.opcheck(op.default, ([], 2.0))


def test_errors_name_the_argument():
    good = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"grads\[1\] is on meta but grads\[0\] is on cpu"):
        op([good, torch.ones(3, device="meta")], 2.0)
    with pytest.raises(RuntimeError, match=r"grads\[1\] must be float32, float64, bfloat16 or float16, got Long"):
        op([good, torch.ones(3, dtype=torch.int64)], 2.0)
    with pytest.raises(RuntimeError, match=r"grads\[2\] must be float32.*got ComplexFloat"):
        op([good, good, torch.ones(3, dtype=torch.complex64)], 2.0)
    with pytest.raises(RuntimeError, match=r"grads\[0\] must be a dense \(strided\) tensor, got a sparse one"):
        op([torch.ones(3).to_sparse(), good], 2.0)
    with pytest.raises(RuntimeError, match="norm_type must be 2.0 or inf, got 1"):
        op([good], 1.0)


@pytest.mark.cuda
def test_a_cuda_tensor_is_named():
    with pytest.raises(RuntimeError, match=r"grads\[1\] is on cuda"):
        op([torch.ones(3), torch.ones(3, device="cuda")], 2.0)


def test_clip_grad_norm_uses_it_with_torchs_result_dtype():
    # FusedAdamW.clip_grad_norm_ returns the op's norm in the dtype torch's get_total_norm
    # returns: the gradients' dtypes promoted (float64 for float32 with float64).
    for dtypes, norm_type in (((torch.float32,), 2.0), ((torch.float32, torch.float64), 2.0),
                              ((torch.bfloat16, torch.float16), INF), ((torch.float32,), INF)):
        params = [torch.nn.Parameter(g) for dtype in dtypes for g in make_grads(dtype, SIZES[:3])]
        for p in params:
            p.grad = torch.randn_like(p)
        norm = noam_ext.FusedAdamW(params).clip_grad_norm_(1.0, norm_type)
        expected = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type)
        assert norm.dtype == expected.dtype
        assert norm == op([p.grad for p in params], norm_type).to(expected.dtype)
        torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)

"""The CUDA kernels' own code, run on the host (see test_cuda_emulation.py), for the
storages beyond torch's own (csrc/noam_ext/storage.h: master weights, 16-bit moments,
bfloat16 gradients of float32 parameters), stochastic rounding, and rows walked through
a strided layout (parameters that are not dense, gradients or state with other
strides): every tensor bit for bit the CPU op's, on the grids of 1, 2 and 132 SMs and
narrow blocks. The CPU op's own numerics are tested in test_low_bytes.py and
test_strided.py; here the GPU code must agree with it."""

from __future__ import annotations

import pytest
import torch

import host_run
from op_args import positional
from storage_cases import (CASES, CHUNK, DTYPES, GRIDS, NUMELS, STORAGES, assert_same, can_round, clone,
                           make_call, storage_id)

def run_both(cpu, grid, steps=2):
    emulated = clone(cpu)
    for step in range(steps):
        scale = {"grad_scale": torch.tensor([2.0]), "found_inf": torch.tensor([0.0]),
                 "grad_clip": torch.tensor([0.3], dtype=torch.float64)} if step == 1 else {}
        torch.ops.noam_ext.fused_adamw_(*positional(cpu), **cpu["options"], **scale)
        host_run.ops().fused_adamw_(*positional(emulated), **GRIDS[grid], **emulated["options"],
                                                      **scale)
    assert_same(cpu, emulated)


@pytest.mark.parametrize("grid", list(GRIDS), ids=list(GRIDS))
@pytest.mark.parametrize("storage,amsgrad,stochastic", CASES,
                         ids=[f"{storage_id(s)}-{'amsgrad' if a else 'adamw'}{'-rounded' if r else ''}"
                              for s, a, r in CASES])
def test_every_storage_on_the_host_run_matches_the_cpu_op(storage, amsgrad, stochastic, grid):
    cpu = make_call(storage, NUMELS, amsgrad, seed=3, stochastic=stochastic)
    run_both(cpu, grid)


@pytest.mark.parametrize("storage", [s for s in STORAGES if s[0] != "float64"], ids=storage_id)
def test_pointers_off_the_16_byte_grid(storage):
    # Every third tensor starts one element into its buffer: a plain storage takes a
    # scalar head then vectors, a mixed one (pointers of 2- and 4-byte elements at one
    # element's offset are not at one offset within 16 bytes) the element path.
    cpu = make_call(storage, NUMELS, amsgrad=False, seed=4, stochastic=can_round(storage), misaligned_every=3)
    run_both(cpu, "2 SMs")


@pytest.mark.parametrize("storage", [s for s in STORAGES if can_round(s)], ids=storage_id)
def test_stochastic_rounding_across_two_to_the_32_elements_of_a_parameter(storage):
    # Shards whose elements' indices in the whole parameter cross a multiple of 2**32:
    # the kernels switch keys there exactly as the CPU op does.
    offsets = [2**32 - 3, 2**32 - CHUNK - 5, 0, 7 * 2**32 + 11, 2**33 - 100, 5, 2**32, 3, 2**32 - 1]
    if storage[2] == "8bit":   # (its offsets are whole blocks: op_checks.h)
        offsets = [2**32 - 256, 2**32 - CHUNK - 512, 0, 7 * 2**32 + 256, 2**33 - 1024, 256, 2**32, 768, 2**32 - 256]
    cpu = make_call(storage, NUMELS, amsgrad=False, seed=5, stochastic=True, offsets=offsets)
    run_both(cpu, "132 SMs")


def test_stochastic_rounding_does_not_depend_on_the_grid():
    storage = ("bfloat16", "bfloat16", "bfloat16", "none")
    results = []
    for grid in GRIDS:
        a = make_call(storage, NUMELS, amsgrad=True, seed=6, stochastic=True)
        host_run.ops().fused_adamw_(*positional(a), **GRIDS[grid], **a["options"])
        results.append([t.view(torch.int16) for t in a["params"] + a["exp_avgs"] + a["exp_avg_sqs"]])
    for other in results[1:]:
        assert all(torch.equal(x, y) for x, y in zip(results[0], other))


# ---- mixed element sizes at a common offset ------------------------------------------------------

def one_element_in(t):
    """A copy of t that starts one element into a fresh buffer (as a view into a flat buffer does)."""
    out = torch.empty(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape)
    out.copy_(t)
    return out


# (Not 8-bit moments: a lane's 8 elements start on a block's 32nd, so their rows take
# vectors only when every pointer is 16-byte aligned at element 0, and the element path
# otherwise, as test_pointers_off_the_16_byte_grid runs.)
MIXED = [s for s in STORAGES if not (s[0] == s[1] == s[2] and s[3] == "none") and s[2] != "8bit"]


@pytest.mark.parametrize("storage", MIXED, ids=storage_id)
def test_mixed_rows_one_element_into_their_buffers_take_vectors_after_a_head(storage):
    # Views at the same element of 16-byte aligned buffers, of different element sizes (a
    # bfloat16 parameter at byte 2, float32 moments at byte 4): a head of 16 / 2 - 1 = 7
    # elements one by one brings every pointer to a 16-byte boundary, then vectors.
    cpu = make_call(storage, [4097, 300, 5], amsgrad=True, seed=11, stochastic=can_round(storage))
    emulated = clone(cpu)
    for key in ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "masters"):
        emulated[key] = [one_element_in(t) for t in emulated[key]]
    emulated["options"]["masters"] = emulated["masters"] if storage[3] != "none" else None
    stats = torch.zeros(5, dtype=torch.int64)
    torch.ops.noam_ext.fused_adamw_(*positional(cpu), **cpu["options"])
    host_run.ops().fused_adamw_(*positional(emulated), multiprocessors=132, stats=stats, **emulated["options"])
    assert_same(cpu, emulated)
    loads, stores = stats[3].item(), stats[4].item()
    assert loads > 0 and stores > 0, "the rows took the element path"


# ---- rows walked through a strided layout ------------------------------------------------------

def gappy(t):
    out = torch.empty(*t.shape, 3, dtype=t.dtype)[..., 1]
    out.copy_(t)
    return out


@pytest.mark.parametrize("grid", list(GRIDS), ids=list(GRIDS))
@pytest.mark.parametrize("storage", [("float32",) * 3 + ("none",), ("bfloat16",) * 3 + ("none",),
                                     ("bfloat16", "bfloat16", "float32", "remainder"),
                                     ("float32", "bfloat16", "bfloat16", "none"),
                                     ("float32", "float32", "8bit", "none"),
                                     ("bfloat16", "bfloat16", "8bit", "remainder")], ids=storage_id)
def test_strided_rows_on_the_host_run_match_the_cpu_op(storage, grid):
    cpu = make_call(storage, NUMELS, amsgrad=True, seed=7, stochastic=can_round(storage))
    # Every other parameter a view with gaps; one gradient transposed-like; one state gappy.
    for i in range(0, len(NUMELS), 2):
        cpu["params"][i] = gappy(cpu["params"][i])
    cpu["grads"][1] = gappy(cpu["grads"][1])
    cpu["exp_avg_sqs"][2] = gappy(cpu["exp_avg_sqs"][2])
    if storage[3] != "none":
        cpu["masters"][4] = gappy(cpu["masters"][4])
        cpu["options"]["masters"] = cpu["masters"]
    emulated = clone(cpu)
    for key in ("params", "grads", "exp_avg_sqs", "masters"):
        for i, t in enumerate(cpu[key]):
            if not t.is_contiguous():
                emulated[key][i] = gappy(t)
    emulated["options"]["masters"] = emulated["masters"] if storage[3] != "none" else None
    for _ in range(2):
        torch.ops.noam_ext.fused_adamw_(*positional(cpu), **cpu["options"])
        host_run.ops().fused_adamw_(*positional(emulated), **GRIDS[grid], **emulated["options"])
    assert_same(cpu, emulated)


def test_a_multi_dimensional_strided_row_spanning_chunks():
    def gappy_permuted():
        return torch.empty(40, 30, 50, 2)[..., 0].permute(2, 0, 1)   # (50, 40, 30): 60,000 elements, not dense

    cpu = make_call(("float32",) * 3 + ("none",), [60000], amsgrad=False, seed=8)
    cpu["params"][0] = gappy_permuted().copy_(cpu["params"][0].view(50, 40, 30))
    for key in ("grads", "exp_avgs", "exp_avg_sqs"):
        cpu[key][0] = cpu[key][0].view(50, 40, 30)
    emulated = clone(cpu)
    emulated["params"][0] = gappy_permuted().copy_(cpu["params"][0])   # clone() would make it contiguous
    torch.ops.noam_ext.fused_adamw_(*positional(cpu), **cpu["options"])
    host_run.ops().fused_adamw_(*positional(emulated), multiprocessors=132, **emulated["options"])
    assert_same(cpu, emulated)

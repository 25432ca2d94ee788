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

import noam_ext
import host_run
from op_args import clone as clone_tensors, hyper_table, positional

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STORAGES = [tuple(s) for s in noam_ext._C.supported_storage()]
GRIDS = {"1 SM": dict(multiprocessors=1), "2 SMs": dict(multiprocessors=2), "132 SMs": dict(multiprocessors=132),
         "3x7": dict(num_blocks=3, threads_per_block=7), "5x96": dict(num_blocks=5, threads_per_block=96)}
CHUNK = 16384
NUMELS = [5, 3, 4097, 1, 130, 2 * CHUNK + 37, 8, 0, 17]


def storage_id(s):
    return "-".join(s)


def make_call(storage, numels, amsgrad, seed=0, stochastic=False, offsets=None, misaligned_every=0):
    """Arguments of one op call whose tensors are stored as `storage` (param, grad,
    moment, master): random values where the kernels read them."""
    param, grad, moment, master = storage
    generator = torch.Generator().manual_seed(seed)

    def tensor(n, dtype, positive=False, odd=False):
        values = torch.randn(n + 1, generator=generator, dtype=torch.float64)
        values = (values.abs() if positive else values).to(DTYPES[dtype])
        return values[1:] if odd else values[:n].clone()

    args = {k: [] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps",
                            "masters")}
    for i, n in enumerate(numels):
        odd = misaligned_every > 0 and (i + 1) % misaligned_every == 0
        args["params"].append(tensor(n, param, odd=odd))
        args["grads"].append(tensor(n, grad, odd=odd))
        args["exp_avgs"].append(tensor(n, moment, odd=odd))
        args["exp_avg_sqs"].append(tensor(n, moment, positive=True, odd=odd))
        if amsgrad:
            args["max_exp_avg_sqs"].append(tensor(n, moment, positive=True, odd=odd))
        if master == "float32":
            args["masters"].append(args["params"][-1].float() + tensor(n, "float32", odd=odd).mul(1e-3))
        elif master == "remainder":
            bits = torch.randint(-2**15, 2**15, (n + 1,), generator=generator, dtype=torch.int16)
            args["masters"].append(bits[1:] if odd else bits[:n].clone())
        args["state_steps"].append(torch.tensor(float(i % 4)))
    args["schedule_step"] = torch.tensor([5], dtype=torch.int64)
    args["hyper"] = hyper_table(3)
    args["groups"] = [i % 3 for i in range(len(numels))]
    args["options"] = dict(masters=args["masters"] if master != "none" else None,
                           stochastic_rounding=stochastic,
                           rng_streams=[(0x9E3779B97F4A7C15 * (i + 1)) % 2**63 for i in range(len(numels))]
                           if stochastic else [],
                           element_offsets=offsets or [])
    return args


def on_device(args, device):
    """A copy of a call's arguments on `device` (the same objects for the CPU), options
    (masters, GradScaler tensors, clipping factor) included."""
    if device == "cpu":
        return args
    out = {}
    for key, value in args.items():
        if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            out[key] = [t.to(device) for t in value]
        elif isinstance(value, torch.Tensor):
            out[key] = value.to(device)
        else:
            out[key] = dict(value) if key == "options" else value
    out["options"]["masters"] = out["masters"] if args["options"]["masters"] is not None else None
    for name in ("grad_scale", "found_inf", "grad_clip"):
        if out["options"].get(name) is not None:
            out["options"][name] = out["options"][name].to(device)
    return out


def clone(a):
    """op_args.clone, with the copy's options pointing at the copy's masters."""
    out = clone_tensors(a)
    out["options"] = dict(a["options"], masters=out["masters"] if a["options"]["masters"] is not None else None)
    return out


def assert_same(expected, actual):
    for key in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps", "masters"):
        for i, (e, x) in enumerate(zip(expected[key], actual[key])):
            assert torch.equal(x, e), f"{key}[{i}] differs"
    assert torch.equal(expected["schedule_step"], actual["schedule_step"])


def run_both(cpu, grid, steps=2):
    emulated = clone(cpu)
    for step in range(steps):
        scale = {"grad_scale": torch.tensor([2.0]), "found_inf": torch.tensor([0.0]),
                 "grad_clip": torch.tensor([0.3], dtype=torch.float64)} if step == 1 else {}
        torch.ops.noam_ext.fused_adamw_(*positional(cpu), **cpu["options"], **scale)
        host_run.ops().fused_adamw_(*positional(emulated), **GRIDS[grid], **emulated["options"],
                                                      **scale)
    assert_same(cpu, emulated)


def can_round(storage):
    param, _, moment, master = storage
    return (param == "bfloat16" and master == "none") or moment == "bfloat16"


CASES = [(s, amsgrad, stochastic) for s in STORAGES for amsgrad in (False, True)
         for stochastic in ((False, True) if can_round(s) else (False,))]


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


MIXED = [s for s in STORAGES if not (s[0] == s[1] == s[2] and s[3] == "none")]


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
                                     ("float32", "bfloat16", "bfloat16", "none")], ids=storage_id)
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

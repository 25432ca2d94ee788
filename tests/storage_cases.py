"""The storage combinations of the op as test cases, shared by the tests of the host
run, the CUDA op and the float64 reference: one call's arguments for a storage
(make_call), on a device (on_device), compared bit for bit (assert_same)."""

from __future__ import annotations

import torch

import noam_ext
from op_args import clone as clone_tensors, hyper_table, positional

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Every storage of the op; those with 8-bit moments (codes, with scales in the op's
# moment_absmax) are EIGHT_BIT_STORAGES too.
STORAGES = [tuple(s) for s in noam_ext._C.supported_storage()]
EIGHT_BIT_STORAGES = [s for s in STORAGES if s[2] == "8bit"]
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

    def moment_of(key, n, positive=False, odd=False):
        if moment != "8bit":
            args[key].append(tensor(n, moment, positive=positive, odd=odd))
            return
        # codes of random moments by the op's own encoder, and their scales (one per block)
        codes, scales = noam_ext._C.quantize_blocks(tensor(n, "float32", positive=positive), not positive)
        if odd:
            codes = torch.cat([codes.new_zeros(1), codes])[1:]
        args[key].append(codes)
        args["moment_absmax"].append(scales)

    args = {k: [] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps",
                            "masters", "moment_absmax")}
    for i, n in enumerate(numels):
        odd = misaligned_every > 0 and (i + 1) % misaligned_every == 0
        args["params"].append(tensor(n, param, odd=odd))
        args["grads"].append(tensor(n, grad, odd=odd))
        moment_of("exp_avgs", n, odd=odd)
        moment_of("exp_avg_sqs", n, positive=True, odd=odd)
        if amsgrad:
            moment_of("max_exp_avg_sqs", n, positive=True, odd=odd)
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
                           moment_absmax=args["moment_absmax"] if moment == "8bit" else None,
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
    out["options"]["moment_absmax"] = out["moment_absmax"] if args["options"].get("moment_absmax") else None
    for name in ("grad_scale", "found_inf", "grad_clip"):
        if out["options"].get(name) is not None:
            out["options"][name] = out["options"][name].to(device)
    return out


def clone(a):
    """op_args.clone, with the copy's options pointing at the copy's masters."""
    out = clone_tensors(a)
    out["options"] = dict(a["options"], masters=out["masters"] if a["options"]["masters"] is not None else None,
                          moment_absmax=out["moment_absmax"] if a["options"].get("moment_absmax") else None)
    return out


def assert_same(expected, actual):
    for key in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps", "masters", "moment_absmax"):
        for i, (e, x) in enumerate(zip(expected.get(key, []), actual.get(key, []))):
            assert torch.equal(x, e), f"{key}[{i}] differs"
    assert torch.equal(expected["schedule_step"], actual["schedule_step"])


def can_round(storage):
    param, _, moment, master = storage
    return (param == "bfloat16" and master == "none") or moment == "bfloat16"


CASES = [(s, amsgrad, stochastic) for s in STORAGES for amsgrad in (False, True)
         for stochastic in ((False, True) if can_round(s) else (False,))]

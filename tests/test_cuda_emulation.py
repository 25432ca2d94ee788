"""The CUDA kernel's work split, run on the host (noam_ext::emulate_cuda_fused_adamw_
executes csrc/cuda/fused_adamw_plan.h, the code the kernel runs, over an emulated
grid) must give exactly the bits of the CPU op on awkward layouts. This is how
CI, which has no GPU, checks the kernel's chunks, segment walk, 16-byte vectors,
unrolling, tails and group boundaries."""

from __future__ import annotations

import pytest
import torch

from noam_ext._flat import AMSGRAD, BETA1, BETA2, D_MODEL, EPS, LR, MAXIMIZE, NUM_HYPER_COLUMNS, WARMUP, \
    WEIGHT_DECAY, aligned_offsets

CHUNK = 16384  # kChunkElements in fused_adamw_plan.h

LAYOUTS = {
    "empty": [0],
    "one": [1],
    "three": [3],
    "four": [4],
    "five": [5],
    "4097": [4097],
    "odd-boundaries": [5, 3, 7, 1, 130, 9, 4097, 2],
    "many-tiny": [(i * 7) % 6 + 1 for i in range(300)],
    "one-huge": [5 * CHUNK + 123],
    "huge-and-tiny": [3, CHUNK - 1, 1, 2 * CHUNK + 5, 0, 17],
}


def make_args(numels, dtype, amsgrad, seed):
    generator = torch.Generator().manual_seed(seed)
    offsets, length = aligned_offsets(numels, torch.tensor([], dtype=dtype).element_size())
    rand = lambda: torch.randn(length, generator=generator, dtype=torch.float64).to(dtype)  # noqa: E731
    groups = 3
    hyper = torch.zeros(groups, NUM_HYPER_COLUMNS, dtype=torch.float64)
    hyper[:, LR] = torch.tensor([1.0, 0.5, 2e-3])
    hyper[:, BETA1] = torch.tensor([0.9, 0.8, 0.95])
    hyper[:, BETA2] = torch.tensor([0.98, 0.999, 0.99])
    hyper[:, EPS] = torch.tensor([1e-9, 1e-8, 1e-6])
    hyper[:, WEIGHT_DECAY] = torch.tensor([0.01, 0.0, 0.1])
    hyper[:2, D_MODEL], hyper[:2, WARMUP] = 64.0, 10.0       # groups 0, 1 scheduled
    hyper[:, AMSGRAD] = torch.tensor([float(amsgrad), 0.0, float(amsgrad)])
    hyper[:, MAXIMIZE] = torch.tensor([0.0, 1.0, 0.0])
    n = len(numels)
    return dict(
        param=rand(), grad=rand(), exp_avg=rand(), exp_avg_sq=rand().abs(),
        max_exp_avg_sq=rand().abs() if amsgrad else None,
        param_steps=torch.tensor([float(i % 4) for i in range(n)]),
        schedule_step=torch.tensor([5, 0], dtype=torch.int64),
        segments=torch.tensor([[o, k, i % groups] for i, (o, k) in enumerate(zip(offsets, numels))],
                              dtype=torch.int64).reshape(-1, 3),
        hyper=hyper,
        active=torch.tensor([i % 5 != 3 for i in range(n)]),
    )


def positional(a):
    return (a["param"], a["grad"], a["exp_avg"], a["exp_avg_sq"], a["max_exp_avg_sq"], a["param_steps"],
            a["schedule_step"], a["segments"], a["hyper"], a["active"])


def clone(a):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}


@pytest.mark.parametrize("grid", [(1, 1), (3, 7), (2, 32), (132, 256)], ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["float32", "float64", "bfloat16", "float16"])
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_emulated_kernel_matches_cpu_op_bit_for_bit(layout, dtype, grid):
    numels = LAYOUTS[layout]
    amsgrad = layout in ("odd-boundaries", "huge-and-tiny", "many-tiny")
    cpu = make_args(numels, dtype, amsgrad, seed=len(numels))
    emulated = clone(cpu)
    for step in range(2):
        scale = {"grad_scale": torch.tensor([2.0]), "found_inf": torch.tensor([0.0])} if step == 1 else {}
        torch.ops.noam_ext.fused_adamw_(*positional(cpu), **scale)
        torch.ops.noam_ext.emulate_cuda_fused_adamw_(*positional(emulated), num_blocks=grid[0],
                                                     threads_per_block=grid[1], **scale)
    for key, value in cpu.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(emulated[key], value), f"{key} differs"


def test_emulated_kernel_skips_everything_on_found_inf():
    a = make_args([5, 4097], torch.float32, True, seed=0)
    before = clone(a)
    torch.ops.noam_ext.emulate_cuda_fused_adamw_(*positional(a), num_blocks=4, threads_per_block=64,
                                                 grad_scale=torch.tensor([8.0]), found_inf=torch.tensor([1.0]))
    for key in ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "param_steps"):
        assert torch.equal(a[key], before[key]), key
    assert a["schedule_step"].tolist() == [before["schedule_step"][0].item() + 1, 0]


def test_offsets_beyond_two_to_the_31_elements():
    # A segment that starts below and ends above element 2**31 of a 2**31 + 8192 element buffer.
    # torch.empty reserves the buffers without touching them; only the segment's pages are
    # written, so this needs a few MB of memory, not 4 GiB per buffer.
    length = 2**31 + 8192
    start, numel = 2**31 - 4992, 9000   # 64-byte aligned, as the optimizer lays segments out

    def buffers(seed):
        generator = torch.Generator().manual_seed(seed)
        out = {}
        for key in ("param", "grad", "exp_avg", "exp_avg_sq"):
            t = torch.empty(length, dtype=torch.bfloat16)
            t[start:start + numel] = torch.randn(numel, generator=generator).to(torch.bfloat16)
            out[key] = t
        out["exp_avg_sq"][start:start + numel].abs_()
        return out

    def call(op, b, **grid):
        hyper = torch.zeros(1, NUM_HYPER_COLUMNS, dtype=torch.float64)
        hyper[0, LR], hyper[0, BETA1], hyper[0, BETA2], hyper[0, EPS] = 1e-2, 0.9, 0.98, 1e-9
        op(b["param"], b["grad"], b["exp_avg"], b["exp_avg_sq"], None, torch.zeros(1),
           torch.zeros(2, dtype=torch.int64), torch.tensor([[start, numel, 0]]), hyper, None, **grid)

    cpu, emulated = buffers(0), buffers(0)
    before = cpu["param"][start:start + numel].clone()
    call(torch.ops.noam_ext.fused_adamw_, cpu)
    call(torch.ops.noam_ext.emulate_cuda_fused_adamw_, emulated, num_blocks=64, threads_per_block=256)
    assert not torch.equal(cpu["param"][start:start + numel], before)
    for key in ("param", "exp_avg", "exp_avg_sq"):
        assert torch.equal(emulated[key][start:start + numel], cpu[key][start:start + numel]), key

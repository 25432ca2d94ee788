"""The CUDA kernel's work split, run on the host (noam_ext::emulate_cuda_fused_adamw_
executes csrc/cuda/fused_adamw_plan.h, the code the kernel runs, over an emulated
grid) must give exactly the bits of the CPU op on awkward layouts. This is how
CI, which has no GPU, checks the kernel's chunks, row walk, 16-byte vectors,
unrolling, tails, misaligned tensors (element path) and group boundaries."""

from __future__ import annotations

import pytest
import torch

from op_args import clone, make_args, positional, tensors_of

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


# 64, 96 and 256 threads are 2, 3 and 8 warps: small parts of a chunk then go to one
# warp each (fused_adamw_plan.h, assign_part); narrower blocks take every part whole.
@pytest.mark.parametrize("grid", [(1, 1), (3, 7), (2, 32), (2, 64), (5, 96), (132, 256)],
                         ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["float32", "float64", "bfloat16", "float16"])
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_emulated_kernel_matches_cpu_op_bit_for_bit(layout, dtype, grid):
    numels = LAYOUTS[layout]
    amsgrad = layout in ("odd-boundaries", "huge-and-tiny", "many-tiny")
    # Every third tensor of the multi-tensor layouts is a misaligned view: the kernel
    # must take its element path there and its vector path elsewhere.
    cpu = make_args(numels, dtype, amsgrad, seed=len(numels), misaligned_every=3 if len(numels) > 1 else 0)
    emulated = clone(cpu)
    for step in range(2):
        scale = {"grad_scale": torch.tensor([2.0]), "found_inf": torch.tensor([0.0]),
                 "grad_clip": torch.tensor([0.3], dtype=torch.float64)} if step == 1 else {}
        torch.ops.noam_ext.fused_adamw_(*positional(cpu), **scale)
        torch.ops.noam_ext.emulate_cuda_fused_adamw_(*positional(emulated), num_blocks=grid[0],
                                                     threads_per_block=grid[1], **scale)
    for (name, expected), (_, actual) in zip(tensors_of(cpu), tensors_of(emulated)):
        assert torch.equal(actual, expected), f"{name} differs"
    assert cpu["schedule_step"].tolist() == [7, 0]


def test_misaligned_views_take_the_element_path():
    # A misaligned tensor through the vector path would trip the emulation's
    # alignment assertion (what the GPU would fault on).
    a = make_args([4097, 33], torch.float32, misaligned_every=1)
    assert all(t.data_ptr() % 16 != 0 for t in a["params"])
    before = clone(a)
    torch.ops.noam_ext.emulate_cuda_fused_adamw_(*positional(a), num_blocks=2, threads_per_block=32)
    assert not torch.equal(a["params"][0], before["params"][0])


def test_emulated_kernel_skips_everything_on_found_inf():
    a = make_args([5, 4097], torch.float32, True, seed=0)
    before = clone(a)
    torch.ops.noam_ext.emulate_cuda_fused_adamw_(*positional(a), num_blocks=4, threads_per_block=64,
                                                 grad_scale=torch.tensor([8.0]), found_inf=torch.tensor([1.0]))
    for (name, expected), (_, actual) in zip(tensors_of(before), tensors_of(a)):
        if name != "schedule_step":
            assert torch.equal(actual, expected), name
    assert a["schedule_step"].tolist() == [6, 0]


def test_advance_schedule_false_leaves_the_schedule_and_advances_the_steps():
    a = make_args([5, 7], torch.float32)
    torch.ops.noam_ext.emulate_cuda_fused_adamw_(*positional(a), num_blocks=2, threads_per_block=8,
                                                 advance_schedule=False)
    assert a["schedule_step"].tolist() == [5, 0]
    assert [float(s) for s in a["state_steps"]] == [1.0, 2.0]


def test_row_walk_past_two_to_the_31_elements():
    # Rows whose virtual offsets and local indices pass 2**31: the walk must keep
    # 64-bit values (no tensors are allocated; only the walk runs).
    big = 2**31 + 5
    numels = [big, 7, 3 * 2**30]
    start = 2**31 - 8
    walk = torch.ops.noam_ext.emulate_row_walk(numels, start, start + 2**31)
    triples = [tuple(walk[k:k + 3]) for k in range(0, len(walk), 3)]
    second = -(-big // 16) * 16            # rows start on multiples of 16 elements
    third = -(-(second + 7) // 16) * 16
    assert triples == [(0, start, big), (1, 0, 7), (2, 0, start + 2**31 - third)]


def test_any_number_of_param_groups():
    # The kernel reads the hyperparameter table from memory (no by-value limit):
    # 100 groups, each with its own lr, match the CPU op.
    groups = 100
    cpu = make_args([(i * 13) % 50 + 1 for i in range(250)], torch.float32, seed=3, groups=3)
    cpu["hyper"] = cpu["hyper"][torch.arange(groups) % 3].clone()
    cpu["hyper"][:, 0] *= torch.linspace(0.5, 2.0, groups, dtype=torch.float64)
    cpu["groups"] = [i % groups for i in range(250)]
    emulated = clone(cpu)
    torch.ops.noam_ext.fused_adamw_(*positional(cpu))
    torch.ops.noam_ext.emulate_cuda_fused_adamw_(*positional(emulated), num_blocks=3, threads_per_block=256)
    for (name, expected), (_, actual) in zip(tensors_of(cpu), tensors_of(emulated)):
        assert torch.equal(actual, expected), f"{name} differs"


def test_warp_parts_cover_each_element_once():
    # Tiny tensors, all in one chunk: with 8 warps each takes every 8th of them.
    # An element left out or updated twice would differ from the CPU op.
    numels = [1, 8, 9, 16, 31, 64, 100, 255, 256, 257, 511, 512, 513] * 3
    for dtype in (torch.float32, torch.bfloat16):
        cpu = make_args(numels, dtype, seed=11)
        emulated = clone(cpu)
        torch.ops.noam_ext.fused_adamw_(*positional(cpu))
        torch.ops.noam_ext.emulate_cuda_fused_adamw_(*positional(emulated), num_blocks=1, threads_per_block=256)
        for (name, expected), (_, actual) in zip(tensors_of(cpu), tensors_of(emulated)):
            assert torch.equal(actual, expected), f"{dtype} {name} differs"

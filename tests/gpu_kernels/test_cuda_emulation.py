"""The CUDA kernels' own code, run on the host, must give exactly the bits of the CPU op.

noam_ext_host_run::fused_adamw_ (tests/host_run/) compiles csrc/cuda/kernels.cuh (prepare_kernel,
update_kernel, DeviceExec, the device branches of the 16-byte loads and stores, and
the grid run_rows launches) as host C++ and calls each kernel once per (block, thread)
of the launches a GPU with the given number of SMs would get. The 16-byte accesses
check their alignment (the GPU would fault) and are counted. This is how CI, which has
no GPU, checks the kernels: chunks, row walk, warp parts, vectors, unrolling, tails,
the scalar head before a shared 16-byte boundary, the element path, 64-bit offsets,
GradScaler, clipping and the schedule counter. A deliberately wrong launch must be
caught (test_a_wrong_launch_is_caught)."""

from __future__ import annotations

import mmap
import random

import pytest
import torch

import host_run
from op_args import LIST_KEYS, clone, make_args, positional, tensors_of

CHUNK = 16384  # kChunkElements in csrc/cuda/launch_policy.cuh
THREADS = 256  # kThreadsPerBlock
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPE_IDS = ["float32", "float64", "bfloat16", "float16"]

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


def blocks_per_sm(dtype, amsgrad):
    """min_blocks_per_sm in launch_policy.cuh: the update grid is one wave of these."""
    return 2 if dtype == torch.float64 else 3 if amsgrad else 4


def emulate(args, **options):
    """One host run of the kernels; returns what it reports (its grid and the vectors moved)."""
    stats = torch.zeros(5, dtype=torch.int64)
    host_run.ops().fused_adamw_(*positional(args), stats=stats, **options)
    prepare_blocks, update_blocks, threads, loads, stores = stats.tolist()
    return dict(prepare_blocks=prepare_blocks, update_blocks=update_blocks, threads=threads, loads=loads,
                stores=stores)


def assert_same(expected, actual, what=""):
    for (name, e), (_, a) in zip(tensors_of(expected), tensors_of(actual)):
        assert torch.equal(a, e), f"{what}{name} differs"


def at_offset(t: torch.Tensor, elements: int) -> torch.Tensor:
    """A copy of t that starts `elements` elements past a 64-byte boundary (torch's CPU
    allocations are 64-byte aligned), as a view into a larger parameter would."""
    buffer = torch.empty(t.numel() + elements, dtype=t.dtype)
    view = buffer[elements:].view(t.shape)
    view.copy_(t)
    return view


# The real launches for 1, 2 and 132 SMs, and grids of other shapes: 1 and 7 threads
# (narrower than a warp: every part by the whole block), 96 threads (3 warps).
GRIDS = {"1 SM": dict(multiprocessors=1), "2 SMs": dict(multiprocessors=2),
         "132 SMs": dict(multiprocessors=132), "1x1": dict(num_blocks=1, threads_per_block=1),
         "3x7": dict(num_blocks=3, threads_per_block=7), "5x96": dict(num_blocks=5, threads_per_block=96)}


@pytest.mark.parametrize("grid", list(GRIDS), ids=list(GRIDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_kernels_on_the_host_match_the_cpu_op_bit_for_bit(layout, dtype, grid):
    numels = LAYOUTS[layout]
    amsgrad = layout in ("odd-boundaries", "huge-and-tiny", "many-tiny")
    # Every third tensor of the multi-tensor layouts is a view one element in (all its
    # pointers at the same offset): a scalar head, then aligned vectors.
    cpu = make_args(numels, dtype, amsgrad, seed=len(numels), misaligned_every=3 if len(numels) > 1 else 0)
    emulated = clone(cpu)
    for key in LIST_KEYS:
        emulated[key] = [at_offset(t, 1) if t.data_ptr() % 16 else t for t in emulated[key]]
    for step in range(2):
        scale = {"grad_scale": torch.tensor([2.0]), "found_inf": torch.tensor([0.0]),
                 "grad_clip": torch.tensor([0.3], dtype=torch.float64)} if step == 1 else {}
        torch.ops.noam_ext.fused_adamw_(*positional(cpu), **scale)
        emulate(emulated, **GRIDS[grid], **scale)
    assert_same(cpu, emulated)
    assert cpu["schedule_step"].tolist() == [7]


MIN_CHUNK = 1024  # kMinChunkElements


def virtual_length(numels):
    """work_split.h: rows end to end, each starting at a multiple of 16 elements."""
    end = 0
    for i, n in enumerate(numels):
        start = -(-end // 16) * 16 if i else 0
        end = start + n
    return end


def expected_update_grid(numels, sms, blocks_per_sm):
    """(chunk elements, update blocks) as kernels.cuh sizes them: chunks of CHUNK, or fewer
    elements (multiples of MIN_CHUNK) so that a small call spreads over every resident block;
    one wave, at most a block per chunk, at least one block."""
    total, resident = virtual_length(numels), sms * blocks_per_sm
    per_block = -(-total // resident)
    chunk = min(max(-(-per_block // MIN_CHUNK) * MIN_CHUNK, MIN_CHUNK), CHUNK)
    return chunk, max(1, min(-(-total // chunk), resident))


def test_the_grid_is_run_rows_own():
    # One wave of resident blocks (4 per SM, 3 with amsgrad, 2 for float64), at most one
    # per chunk and at least one; the prepare launch has a thread per row.
    def grid(numels, dtype=torch.float32, amsgrad=False, sms=132):
        return emulate(make_args(numels, dtype, amsgrad), multiprocessors=sms)

    assert grid([0]) == dict(prepare_blocks=1, update_blocks=1, threads=THREADS, loads=0, stores=0)
    assert grid([5 * CHUNK], sms=1)["update_blocks"] == 4
    assert grid([5 * CHUNK], amsgrad=True, sms=1)["update_blocks"] == 3
    assert grid([5 * CHUNK], torch.float64, sms=2)["update_blocks"] == 4
    assert grid([5 * CHUNK], torch.bfloat16, sms=2)["update_blocks"] == 8     # chunks of 10240
    assert grid([5 * CHUNK + 1], torch.float16, sms=132)["update_blocks"] == 81   # chunks of 1024
    assert grid([1] * 257, sms=132) == dict(prepare_blocks=2, update_blocks=5, threads=THREADS, loads=0, stores=0)
    assert grid([40 * CHUNK], sms=4)["update_blocks"] == 16   # a large call: chunks of CHUNK, one wave
    for numels, dtype, amsgrad, sms in [([3] * 1000, torch.float32, False, 132), ([4097, 5] * 30, torch.bfloat16, True, 8),
                                        ([CHUNK * 4 + 7], torch.float64, False, 132), ([77] * 3, torch.float32, False, 1)]:
        _, blocks = expected_update_grid(numels, sms, blocks_per_sm(dtype, amsgrad))
        assert grid(numels, dtype, amsgrad, sms)["update_blocks"] == blocks, (numels[:2], dtype, amsgrad, sms)


def test_many_tiny_tensors_spread_over_the_sms():
    # 1000 three-element tensors: 16 chunks of 1024 virtual elements, so 16 blocks on 16 SMs
    # (one 16384-element chunk, one block, with chunks of a fixed size), and the CPU op's bits.
    cpu = make_args([3] * 1000, torch.float32, seed=4)
    emulated = clone(cpu)
    torch.ops.noam_ext.fused_adamw_(*positional(cpu))
    stats = emulate(emulated, multiprocessors=132)
    assert stats["update_blocks"] == 16
    assert_same(cpu, emulated)


# ---- the vectors: aligned, after a scalar head, or none -------------------------------------------------------

def one_row(numel, dtype, amsgrad=False, seed=0):
    cpu = make_args([numel], dtype, amsgrad, seed=seed)
    return cpu, clone(cpu)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("offset", [0, 1, 3], ids=["aligned", "one element in", "three elements in"])
def test_pointers_at_one_offset_take_vectors_after_a_scalar_head(dtype, offset):
    numel, amsgrad = 1000, True
    cpu, emulated = one_row(numel, dtype, amsgrad)
    for key in LIST_KEYS[:5]:
        emulated[key] = [at_offset(t, offset) for t in emulated[key]]
    torch.ops.noam_ext.fused_adamw_(*positional(cpu))
    stats = emulate(emulated)
    assert_same(cpu, emulated)
    width = 16 // torch.empty((), dtype=dtype).element_size()
    head = (width - offset % width) % width
    vectors = (numel - head) // width
    # Five tensors loaded, four stored (not the gradient), one vector each time.
    assert (stats["loads"], stats["stores"]) == (5 * vectors, 4 * vectors)


@pytest.mark.parametrize("misaligned", ["param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_one_pointer_at_another_offset_takes_the_element_path(misaligned, dtype):
    cpu, emulated = one_row(4097, dtype, amsgrad=True)
    key = {"param": "params", "grad": "grads"}.get(misaligned, misaligned + "s")
    emulated[key] = [at_offset(t, 1) for t in emulated[key]]
    torch.ops.noam_ext.fused_adamw_(*positional(cpu))
    stats = emulate(emulated, multiprocessors=1)
    assert_same(cpu, emulated)
    assert (stats["loads"], stats["stores"]) == (0, 0)


# ---- random layouts ----------------------------------------------------------------------------------------

def random_case(seed: int):
    rng = random.Random(seed)
    n = rng.randint(1, 12)
    sizes = []
    for _ in range(n):
        kind = rng.random()
        sizes.append(0 if kind < 0.05 else rng.randint(1, 40) if kind < 0.5 else rng.randint(41, 3000)
                     if kind < 0.85 else rng.randint(CHUNK - 20, 3 * CHUNK + 20))
    dtype = rng.choice(DTYPES)
    amsgrad = rng.random() < 0.4
    # Per tensor: aligned, or its pointers all at one offset, or one of them at another.
    misalign = [rng.choice(["none", "none", "all", "params", "grads", "exp_avgs", "exp_avg_sqs"]
                           + (["max_exp_avg_sqs"] if amsgrad else [])) for _ in range(n)]
    options = {}
    if rng.random() < 0.4:
        options["grad_scale"] = torch.tensor([rng.choice([0.5, 4.0, 65536.0])])
        options["found_inf"] = torch.tensor([1.0 if rng.random() < 0.25 else 0.0])
    if rng.random() < 0.4:
        options["grad_clip"] = torch.tensor([rng.uniform(0.01, 1.0)], dtype=torch.float64)
    if rng.random() < 0.2:
        options["advance_schedule"] = False
    sms = rng.choice([1, 2, 132])
    return sizes, dtype, amsgrad, misalign, options, sms, rng.randint(1, 3)


@pytest.mark.parametrize("seed", range(96))
def test_random_layouts_match_the_cpu_op_bit_for_bit(seed):
    sizes, dtype, amsgrad, misalign, options, sms, offset = random_case(seed)
    cpu = make_args(sizes, dtype, amsgrad, seed=seed, groups=1 + seed % 3)
    emulated = clone(cpu)
    for i, how in enumerate(misalign):
        for key in LIST_KEYS[:5]:
            if emulated[key] and how in ("all", key):
                emulated[key][i] = at_offset(emulated[key][i], offset)
    for _ in range(2):
        torch.ops.noam_ext.fused_adamw_(*positional(cpu), **options)
        emulate(emulated, multiprocessors=sms, **options)
    assert_same(cpu, emulated, f"{dtype}, amsgrad={amsgrad}, {sms} SMs, sizes {sizes}, {misalign}, {options}: ")


# ---- the mutation check: a wrong launch must be caught --------------------------------------------------------

@pytest.mark.parametrize("wrong", ["block_twice", "last_thread_skipped", "update_before_prepare"])
def test_a_wrong_launch_is_caught(wrong):
    # Three chunks, on a grid of three blocks of 256 threads: every thread has elements
    # (the last thread of the last block too), and block 0 advances the schedule.
    numels = [3 * CHUNK - 100, 37]
    cpu = make_args(numels, torch.float32, seed=1)
    right, wrong_args = clone(cpu), clone(cpu)
    torch.ops.noam_ext.fused_adamw_(*positional(cpu))
    emulate(right, multiprocessors=1)
    assert_same(cpu, right)   # the right launch passes the comparison below
    emulate(wrong_args, multiprocessors=1, wrong_launch=wrong)
    differs = [name for (name, e), (_, a) in zip(tensors_of(cpu), tensors_of(wrong_args))
               if not torch.equal(a, e)]
    assert differs, f"a {wrong} launch went unnoticed"


# ---- the rest of the step ------------------------------------------------------------------------------------

def test_found_inf_skips_everything_but_the_schedule():
    a = make_args([5, 4097], torch.float32, True, seed=0)
    before = clone(a)
    emulate(a, multiprocessors=1, grad_scale=torch.tensor([8.0]), found_inf=torch.tensor([1.0]))
    for (name, expected), (_, actual) in zip(tensors_of(before), tensors_of(a)):
        if name != "schedule_step":
            assert torch.equal(actual, expected), name
    assert a["schedule_step"].tolist() == [6]


def test_advance_schedule_false_leaves_the_schedule_and_advances_the_steps():
    a = make_args([5, 7], torch.float32)
    emulate(a, num_blocks=2, threads_per_block=8, advance_schedule=False)
    assert a["schedule_step"].tolist() == [5]
    assert [float(s) for s in a["state_steps"]] == [1.0, 2.0]


def test_a_step_tensor_shared_by_two_parameters_is_refused():
    # The prepare launch would advance it from two threads at once (on the CPU, twice).
    for op in (torch.ops.noam_ext.fused_adamw_, host_run.ops().fused_adamw_):
        a = make_args([5, 7, 9], torch.float32)
        a["state_steps"][2] = a["state_steps"][0]
        before = clone(a)
        with pytest.raises(RuntimeError, match=r"params\[0\] and params\[2\] share one step tensor"):
            op(*positional(a))
        assert_same(before, a)


def test_any_number_of_param_groups():
    # The kernels read the hyperparameter table from memory (no by-value limit):
    # 100 groups, each with its own lr, match the CPU op.
    groups = 100
    cpu = make_args([(i * 13) % 50 + 1 for i in range(250)], torch.float32, seed=3, groups=3)
    cpu["hyper"] = cpu["hyper"][torch.arange(groups) % 3].clone()
    cpu["hyper"][:, 0] *= torch.linspace(0.5, 2.0, groups, dtype=torch.float64)
    cpu["groups"] = [i % groups for i in range(250)]
    emulated = clone(cpu)
    torch.ops.noam_ext.fused_adamw_(*positional(cpu))
    emulate(emulated, multiprocessors=2)
    assert_same(cpu, emulated)


def test_warp_parts_cover_each_element_once():
    # Tiny tensors, all in one chunk: with 8 warps each takes every 8th of them.
    # An element left out or updated twice would differ from the CPU op.
    numels = [1, 8, 9, 16, 31, 64, 100, 255, 256, 257, 511, 512, 513] * 3
    for dtype in (torch.float32, torch.bfloat16):
        cpu = make_args(numels, dtype, seed=11)
        emulated = clone(cpu)
        torch.ops.noam_ext.fused_adamw_(*positional(cpu))
        emulate(emulated, multiprocessors=1)
        assert_same(cpu, emulated, f"{dtype} ")


# ---- 64-bit offsets ------------------------------------------------------------------------------------------

def test_row_walk_past_two_to_the_31_elements():
    # Rows whose virtual offsets and local indices pass 2**31: the walk must keep
    # 64-bit values (no tensors are allocated; only the walk runs).
    big = 2**31 + 5
    numels = [big, 7, 3 * 2**30]
    start = 2**31 - 8
    walk = host_run.ops().row_walk(numels, start, start + 2**31)
    triples = [tuple(walk[k:k + 3]) for k in range(0, len(walk), 3)]
    second = -(-big // 16) * 16            # rows start on multiples of 16 elements
    third = -(-(second + 7) // 16) * 16
    assert triples == [(0, start, big), (1, 0, 7), (2, 0, start + 2**31 - third)]


MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)   # Linux's value; Python < 3.13 lacks the name


def mapped_zeros(numel: int, dtype: torch.dtype, keep: list) -> torch.Tensor:
    """A zero tensor in an anonymous private mapping that reserves nothing: pages take
    memory only once written, so a tensor past 2**31 elements costs what is touched."""
    size = numel * torch.empty((), dtype=dtype).element_size()
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | MAP_NORESERVE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    keep.append(region)
    return torch.frombuffer(region, dtype=dtype, count=numel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_row_past_two_to_the_31_elements(dtype):
    # Rows [100, 2**31 + 300, 50]: the big row's local indices and the last row's virtual
    # offset pass 2**31. Only the update blocks whose chunks hold the elements around
    # local index 2**31, the big row's end and the last row run (launching the others
    # would touch gigabytes), on the grid of 132 SMs; those elements are checked
    # against the CPU op on copies of them. Every other element is zero and stays zero.
    big = 2**31 + 300
    keep = []
    small = make_args([100, 40, 50], dtype, seed=5)   # values for the rows and the two windows
    args = clone(small)
    for key in LIST_KEYS[:4]:
        args[key][1] = mapped_zeros(big, dtype, keep)
    windows = {2**31 - 10: (1, 0, 20), big - 20: (1, 20, 40)}   # local start: (row, slice of the 40 values)
    for start, (_, lo, hi) in windows.items():
        for key in LIST_KEYS[:4]:
            args[key][1][start:start + (hi - lo)] = small[key][1][lo:hi]
    offsets = [0, 112, -(-(112 + big) // 16) * 16]
    touched = [offsets[1] + start + k for start in windows for k in range(20)] + [offsets[2] + k for k in range(50)]
    grid = 132 * blocks_per_sm(dtype, False)
    blocks = sorted({(v // CHUNK) % grid for v in touched})
    stats = emulate(args, multiprocessors=132, only_blocks=blocks)
    assert stats["update_blocks"] == grid

    torch.ops.noam_ext.fused_adamw_(*positional(small))
    for start, (row, lo, hi) in windows.items():
        for key in LIST_KEYS[:4]:
            assert torch.equal(args[key][row][start:start + (hi - lo)], small[key][row][lo:hi]), (key, start)
    for key in LIST_KEYS[:4]:
        assert torch.equal(args[key][2], small[key][2]), key
        middle = args[key][1][2**30:2**30 + 1000]
        assert not middle.any(), key
    assert [float(s) for s in args["state_steps"]] == [float(s) for s in small["state_steps"]]

"""The host run of the CUDA kernels: a test extension of its own, built here on first use.

host_run.cpp compiles csrc/cuda/kernels.cuh (the kernels and the grid run_rows launches)
as plain C++ against cuda_host_shims.h and registers torch.ops.noam_ext_host_run:
  fused_adamw_  noam_ext::fused_adamw_'s arguments on CPU tensors, every (block, thread)
                of the launches a GPU with `multiprocessors` SMs would get, in turn;
  row_walk      the row walk alone (work_split.h).
It is not part of noam_ext._C, so that the product holds one compilation of the kernels'
header, nvcc's, and torch.ops.noam_ext lists only what users call (docs/architecture.md).

Built with torch.utils.cpp_extension.load (ninja) into build/host_run/ of the repository,
once per change of its sources or of torch: about a minute on 2 cores, cached after.
The flags that decide the bits are setup.py's (-ffp-contract=off: no fused multiply-add
the source does not write), so that the host run and the CPU op round alike.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fvisibility=hidden", "-fwrapv", "-std=c++20"]


@functools.cache
def ops():
    """torch.ops.noam_ext_host_run, built and loaded on first use."""
    from torch.utils import cpp_extension

    build_dir = REPO / "build" / "host_run"
    build_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    print(f"\n[host_run] building or reusing the host run of the CUDA kernels in {build_dir}", file=sys.stderr)
    cpp_extension.load(
        name="noam_ext_host_run",
        sources=[str(HERE / "host_run.cpp"), str(REPO / "csrc" / "noam_ext" / "storage.cpp")],
        extra_include_paths=[str(REPO / "csrc")],
        extra_cflags=CXX_FLAGS,
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    print(f"[host_run] ready in {time.monotonic() - start:.0f} s", file=sys.stderr)
    _register_fakes()
    return torch.ops.noam_ext_host_run


def _register_fakes():
    # For torch.library.opcheck: the op writes in place and returns nothing.
    @torch.library.register_fake("noam_ext_host_run::fused_adamw_")
    def _fused_adamw_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, schedule_step, hyper,
                          groups, *, multiprocessors=132, num_blocks=None, threads_per_block=256, only_blocks=(),
                          wrong_launch="", stats=None, advance_schedule=True, grad_scale=None, found_inf=None,
                          grad_clip=None, masters=None, rng_streams=(), element_offsets=(),
                          stochastic_rounding=False) -> None:
        return None

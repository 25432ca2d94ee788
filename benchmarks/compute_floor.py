"""What one FusedAdamW step costs per element when memory is not the limit.

Each storage variant of bench_step.py's low-byte section steps a parameter small enough to stay
in cache (default 524,288 elements), many times, and the best time per element of several
repeats is printed with the bandwidth it would allow at the variant's bytes per element. Where
that is below the memory ceiling bench_step.py measures, the variant is compute-bound on this
machine, and no loop over memory will reach the ceiling. The time includes step()'s fixed cost
(about 17 us on a 2-core machine: 0.03 ns per element at the default size).

    python benchmarks/compute_floor.py [--elements N] [--threads T] [--repeats R]
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

import noam_ext
from benchlib.low_bytes import VARIANTS, Variant, assign_grad   # bench_step.py's low-byte variants


def seconds_per_step(variant: Variant, elements: int, repeats: int) -> float:
    return best_seconds_per_step(lambda params: noam_ext.FusedAdamW(params, lr=1e-3, **variant.options()),
                                 variant.param, variant.grad, elements, repeats)


def best_seconds_per_step(make: Callable[[list], torch.optim.Optimizer], param_dtype: torch.dtype,
                          grad_dtype: torch.dtype, elements: int, repeats: int) -> float:
    """The best time of one step of make([p]) on one parameter of `elements` values, over
    `repeats` timed runs of many steps (also benchmarks/eight_bit_step.py's floor)."""
    generator = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(elements, generator=generator).to(param_dtype))
    assign_grad(p, torch.randn(elements, generator=generator).to(grad_dtype))
    optimizer = make([p])
    steps = max(20, int(2e8 / elements))
    for _ in range(20):
        optimizer.step()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            optimizer.step()
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elements", type=int, default=524_288, help="elements of the parameter (keep it in cache)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; the best is kept")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.elements:,} elements, {torch.get_num_threads()} threads, CPU capability "
          f"{noam_ext.build_info()['cpu_capability']}, torch {torch.__version__}")
    print(f"| variant | bytes/element | ns/element in cache | the most it can stream |\n|---|---:|---:|---:|")
    for variant in (v for v in VARIANTS if not v.torch_peer):
        ns = seconds_per_step(variant, args.elements, args.repeats) / args.elements * 1e9
        nbytes = variant.bytes_per_element
        print(f"| {variant.name} | {nbytes} | {ns:.3f} | {nbytes / ns:.0f} GB/s |", flush=True)


if __name__ == "__main__":
    main()

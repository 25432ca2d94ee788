"""Timers: the interleaved round-robin timer of whole candidates (each round runs every
candidate once, starting with a different one), and the per-function timers of the step
section (torch.utils.benchmark on the CPU, CUDA events on a GPU), with their medians and
IQRs."""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

@dataclass
class Timing:
    median_s: float
    iqr_s: float
    runs: int


def quartiles(times: list[float]) -> Timing:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return Timing(statistics.median(times), q[2] - q[0], len(times))


def time_cpu(fn, min_run_time: float) -> Timing:
    from torch.utils.benchmark import Timer
    for _ in range(3):
        fn()   # warm-up: state allocation, caches
    m = Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return Timing(m.median, m.iqr, len(m.times) * m.number_per_run)


def time_cuda(fn, min_run_time: float) -> Timing:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times, deadline = [], time.perf_counter() + min_run_time
    while len(times) < 10 or (time.perf_counter() < deadline and len(times) < 2000):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return quartiles(times)


def time_interleaved(candidates: list, run: Callable[[Any], None], warmup: int, iterations: int,
                     sync: Callable[[], None] = lambda: None,
                     before: Callable[[Any], None] | None = None,
                     after: Callable[[Any, bool], None] | None = None) -> dict[str, list[float]]:
    """Times `run(c)` for every candidate `c` (anything with a `.name`), interleaved
    round-robin: round r runs every candidate once, starting with a different candidate
    each round, so that drift in machine speed hits all alike. `before(c)` and
    `after(c, measured)` run around each timed call, outside the timed region (`measured`:
    the round is past the warm-up). Returns name -> the time of each measured round, in
    order."""
    times: dict[str, list[float]] = {c.name: [] for c in candidates}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()   # as timeit does: no collector pauses inside a timed call
    try:
        for r in range(warmup + iterations):
            shift = r % len(candidates)
            for c in candidates[shift:] + candidates[:shift]:   # round-robin, rotating who goes first
                if before is not None:
                    before(c)
                sync()
                start = time.perf_counter()
                run(c)
                sync()
                elapsed = time.perf_counter() - start
                if after is not None:
                    after(c, r >= warmup)
                if r >= warmup:
                    times[c.name].append(elapsed)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times

"""Section 5, the optimizer step on DTensor parameters: FSDP2 (fully_shard per layer and
the root) and tensor parallelism (Shard(0), Shard(1), Replicate), 2 processes on gloo (CPU).
The configurations, the parent side that starts one fresh Python per rank
(benchlib/distributed_worker.py does the measuring) and collects each configuration as soon
as both ranks have written it, and the result: per optimizer, the slower rank's median."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

import noam_ext

from .config import OURS
from .timer import quartiles

WORLD_SIZE = 2
PARALLEL_LABELS = {"fsdp2": "FSDP2", "tensor_parallel": "tensor parallel"}
GAP_LIMIT = 0.05   # param_gap above this: the optimizer did not update as torch for-loop did


def distributed_configs(quick: bool) -> list[dict]:
    """Every (parallelism, model) pair to measure. Many small tensors expose the per-parameter
    cost of torch's DTensor handling; large ones the update itself."""
    encoder = dict(model="encoder", name="TransformerEncoder {layers} x (d={d_model}, heads={heads}, ff={ff})")
    if quick:
        models = [dict(model="linears", count=100, width=16),
                  dict(encoder, d_model=64, heads=2, ff=256, layers=2)]
    else:
        models = [dict(model="linears", count=100, width=16),
                  dict(model="linears", count=100, width=256),
                  dict(model="linears", count=8, width=1024),
                  dict(encoder, d_model=256, heads=4, ff=1024, layers=6)]
    for m in models:
        m["name"] = (f"{m['count']} x Linear({m['width']})" if m["model"] == "linears"
                     else m["name"].format(**m))
    configs = [dict(m, parallel=parallel) for parallel in PARALLEL_LABELS for m in models]
    for index, config in enumerate(configs):
        config["index"] = index
    return configs


def distributed_unavailable() -> str | None:
    """None when this torch can run the section, else why it is skipped."""
    if not dist.is_available() or not dist.is_gloo_available():
        return f"this torch ({torch.__version__}) has no torch.distributed with the gloo backend"
    try:
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401
        except ImportError:
            from torch.distributed._composable.fsdp import fully_shard  # noqa: F401
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module  # noqa: F401
    except ImportError as e:
        return f"this torch ({torch.__version__}) lacks FSDP2 or the tensor-parallel API ({e})"
    return None


@dataclass
class DistResult:
    parallel: str                  # "fsdp2" or "tensor_parallel"
    name: str                      # the model
    params: int
    tensors: int
    dtensors: int                  # parameters that are DTensors
    placements: dict               # "Shard(0)", "Shard(1)", "Replicate" -> how many DTensor parameters
    local_params: list             # elements each rank holds and updates
    threads: int                   # torch threads per rank
    warmup: int
    iterations: int
    timings: dict = field(default_factory=dict)       # optimizer -> Timing of the slower rank
    slower_rank: dict = field(default_factory=dict)   # optimizer -> which rank that was
    rank_timings: dict = field(default_factory=dict)  # optimizer -> [Timing of each rank]
    times_s: dict = field(default_factory=dict)       # optimizer -> [each rank's measured steps]
    param_gap: dict = field(default_factory=dict)     # optimizer -> ||p - p_for_loop|| / ||p_for_loop - p_0||
    reference_moved: float = 0.0   # ||p_for_loop - p_0|| / ||p_0||: the steps changed the parameters
    seconds: float = 0.0           # the configuration's wall time on rank 0 (setup included)

    @property
    def label(self) -> str:
        return f"{PARALLEL_LABELS[self.parallel]}, {self.name}"

    def ratio(self, peer: str) -> float:
        """peer's median over ours (slower rank of each): > 1 means ours is faster."""
        return self.timings[peer].median_s / self.timings[OURS].median_s


def combine(ranks: list[dict], warmup: int, iterations: int) -> DistResult:
    """One configuration from both ranks' results: per optimizer, the rank with the larger
    median sets the figure (a step is as slow as its slowest rank)."""
    first = ranks[0]
    result = DistResult(first["parallel"], first["name"], first["params"], first["tensors"], first["dtensors"],
                        first["placements"], [r["local_params"] for r in ranks], first["threads"], warmup, iterations,
                        param_gap=first["param_gap"], reference_moved=first["reference_moved"],
                        seconds=first["seconds"])
    for name in first["times_s"]:
        per_rank = [quartiles(r["times_s"][name]) for r in ranks]
        slower = max(range(len(ranks)), key=lambda k: per_rank[k].median_s)
        result.timings[name] = per_rank[slower]
        result.slower_rank[name] = slower
        result.rank_timings[name] = per_rank
        result.times_s[name] = [r["times_s"][name] for r in ranks]
    return result


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _tail(path: Path, chars: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:] or "(no output)"


def run_distributed(args, on_result: Callable[[DistResult], None] | None = None) -> tuple[list[DistResult], str | None]:
    """Measures every configuration in one pair of worker processes. Returns the results
    of the configurations both ranks finished, and None or what went wrong (a rank's
    traceback, exit code, output, or a timeout)."""
    configs = distributed_configs(args.quick)
    timeout_s = 120 + 120 * len(configs)
    print(f"[distributed] {WORLD_SIZE} processes on gloo (CPU), {len(configs)} configurations, "
          f"{args.iterations} steps after {args.warmup} warm-up per optimizer", file=sys.stderr, flush=True)
    benchmarks_dir = Path(__file__).resolve().parent.parent
    # The workers import the same noam_ext as this process, and benchlib.
    path = [str(benchmarks_dir), str(Path(noam_ext.__file__).resolve().parent.parent)]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // WORLD_SIZE)), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(path + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    results, problems = [], []
    with tempfile.TemporaryDirectory(prefix="bench_distributed_") as tmp:
        tmp = Path(tmp)
        (tmp / "configs.json").write_text(json.dumps(configs))
        procs, logs = [], []
        try:
            for rank in range(WORLD_SIZE):
                logs.append(open(tmp / f"rank{rank}.log", "w"))
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "benchlib.distributed_worker", "--rank", str(rank),
                     "--world-size", str(WORLD_SIZE), "--dir", str(tmp), "--warmup", str(args.warmup),
                     "--iterations", str(args.iterations)],
                    stdout=logs[-1], stderr=subprocess.STDOUT, cwd=tmp, env=env))
            deadline = time.monotonic() + timeout_s
            pending = list(configs)
            while pending:
                exited = all(p.poll() is not None for p in procs)   # before reading: no file missed
                config = pending[0]
                raw = [_read(tmp / f"result-{config['index']}-rank{rank}.json") for rank in range(WORLD_SIZE)]
                errors = [f"--- rank {rank}:\n{r['error']}" for rank, r in enumerate(raw) if r and "error" in r]
                if errors:
                    problems.append(f"{PARALLEL_LABELS[config['parallel']]}, {config['name']} failed:\n"
                                    + "\n".join(errors))
                    break
                if all(r is not None for r in raw):
                    pending.pop(0)
                    result = combine(raw, args.warmup, args.iterations)
                    report_progress(result, config["index"] + 1, len(configs))
                    results.append(result)
                    if on_result is not None:
                        on_result(result)
                elif exited:
                    break
                elif time.monotonic() > deadline:
                    problems.append(f"the workers were still running after {timeout_s} s and were killed")
                    break
                else:
                    time.sleep(0.2)
            for proc in procs:   # all measured (or given up): let them leave the process group
                try:
                    proc.wait(timeout=max(1.0, min(30.0, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    pass
        finally:
            for proc in procs:   # only the workers started above, also on KeyboardInterrupt
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            for log in logs:
                log.close()
        for rank, proc in enumerate(procs):
            if proc.returncode != 0:
                problems.append(f"rank {rank} exited with code {proc.returncode}; the end of its output:\n"
                                + _tail(tmp / f"rank{rank}.log"))
        if len(results) < len(configs) and not problems:
            problems.append(f"only {len(results)} of {len(configs)} configurations were measured")
    return results, "\n".join(problems) or None


def report_progress(result: DistResult, index: int, total: int) -> None:
    print(f"[distributed {index}/{total}] {result.label}: {result.params:,} parameters, "
          f"{result.dtensors} DTensor parameters {result.placements}, {result.seconds:.1f} s",
          file=sys.stderr, flush=True)
    for name, t in result.timings.items():
        ratio = f"  ({result.ratio(name):.2f}x ours)" if name != OURS else ""
        print(f"    {name:<20} {t.median_s * 1e3:10.3f} ms (rank {result.slower_rank[name]}){ratio}",
              file=sys.stderr, flush=True)
    bad = {n: g for n, g in result.param_gap.items() if not g < GAP_LIMIT}
    if not result.reference_moved > 0:
        print("    WARNING: torch for-loop's steps left the parameters as they were", file=sys.stderr, flush=True)
    if bad:
        print(f"    WARNING: parameters far from torch for-loop's after the steps: {bad}", file=sys.stderr, flush=True)


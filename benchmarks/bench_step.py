"""Benchmarks noam_ext.FusedAdamW (with the in-op Noam schedule) against
torch.optim.AdamW with foreach=False, foreach=True and fused=True (each followed by
TransformerLRScheduler.step(), which the torch loop needs), side by side in one run.

1. Whole training iterations (the headline): zero_grad + forward + loss + backward +
   step (+ scheduler.step() for torch) of an MLP and a torch.nn.TransformerEncoder,
   each timed with `optimizer.zero_grad()` and with `model.zero_grad()` (both with
   torch's default set_to_none=True). Every optimizer trains its own deep copy of the
   model from the same initial weights on the same fixed batch; the candidates run
   interleaved round-robin in this one process (round r runs iteration r of every
   candidate, starting with a different candidate each round), so drift in machine
   speed hits all alike. Each candidate replays its own dropout RNG stream, so all see
   the same dropout masks and end with comparable parameters, a check that every
   optimizer really trained (their gap to torch for-loop is reported). A reference
   "fwd+bwd only" candidate (no optimizer, no step) shows what the optimizer adds.
   Reports medians (and the IQR) after warm-up rounds, and each torch variant's median
   over ours: ratio > 1 means ours is faster; "ours vs torch fused" is the target
   (>= 1.0x). Rows "with clip_grad_norm_" repeat the `optimizer.zero_grad()` iteration
   with gradient clipping (max_norm 0.01, or --clip-max-norm) between backward and step:
   ours calls `optimizer.clip_grad_norm_(max_norm)` (the norm only; its step applies the
   factor as it reads each gradient), torch `torch.nn.utils.clip_grad_norm_(params,
   max_norm, foreach=True)` (the norm, then every gradient scaled in place); "fwd+bwd
   only" does not clip. These models' gradient norms are below 1 (about 0.01-0.5), so
   at max_norm 1.0 the factor is 1 (clipping inactive; the table says which).

2. One optimizer step alone (plus DeepSpeed's CPU Adam when it is installed).
   Layouts: one flat parameter of N elements; transformer-shaped stacks (the weight
   matrices, biases and LayerNorms of torch.nn.TransformerEncoderLayer); the same
   stacks as "flat views" (every parameter, and its gradient, a view into one
   contiguous buffer, as a user or ZeRO might lay them out); many tiny tensors, which
   expose fixed per-step costs. Every optimizer gets the same gradients the way a
   training loop leaves them: `p.grad = tensor` set once and left in place (never
   through an optimizer's own buffers). Reports medians (and the IQR), each peer's
   time over ours, effective bandwidth at 28 bytes per float32 parameter (read p, g,
   m, v; write p, m, v), and that bandwidth as a fraction of a memory ceiling measured
   in the same run: an in-place read-modify-write pass over as many bytes (on a CPU a
   plain copy undercounts because of write-allocate traffic), and on a GPU a device
   copy.

3. Clip + step: for the flat and transformer-shaped layouts of ~1e6 parameters and up
   (all of them in --quick), gradient clipping followed by one step, timed right after that
   layout's step alone: ours `optimizer.clip_grad_norm_(max_norm); optimizer.step()`, torch
   `torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True); optimizer.step()` (+ the
   scheduler) for each AdamW variant, gradients assigned once as above (randn: norm
   ~sqrt(params), so clipping is active; torch's in-place scaling leaves its gradients
   at norm ~1 after the first call, which does not change its work). Effective
   bandwidth counts 32 bytes per parameter for ours (the norm reads the gradient, 28
   for the step) and 40 for torch (4 norm + 8 to scale the gradient in place + 28).

4. Fewer bytes per parameter (issue 17): one step of FusedAdamW with each storage variant
   (float32, 28 bytes per element read and written; float32 with bfloat16 moments, 20;
   float32 with bfloat16 gradients and moments, 18; bfloat16 with a float32 master, 28; with
   an int16 remainder, 26; with a remainder and bfloat16 moments, 18; bfloat16 rounded to
   nearest, 14; bfloat16 with stochastic rounding, 14) against torch.optim.AdamW(fused=True)
   on float32 (28) and on bfloat16 parameters (bfloat16 moments, 14), on flat 1e7 and 1e8
   elements and transformer-shaped stacks of ~1e7 and ~1e8 (--quick: flat 1e6 and the ~1e6
   stack). All run interleaved round-robin (as in section 1) together with one ceiling pass
   per byte count (section 2's, over as many bytes as the variant moves). Each row: bytes per
   element, GB/s, % of the ceiling for its byte count, torch fused float32's and bfloat16's
   time over the variant's, and the issue's targets (CPU, from 1e7 elements: every variant at
   >= 90% of its ceiling; the 14-byte variants >= 1.7x and the 18-byte remainder variant
   >= 1.4x torch fused float32's step time). A variant the device does not run yet (the
   options on CUDA before its kernel lands) is skipped with the error in its row; on the CPU
   such an error stops the run. A layout whose variants do not fit in the memory available
   together is skipped with a note.

5. Distributed: one step on DTensor parameters, 2 processes on gloo (CPU), each a fresh
   Python (benchlib/distributed_worker.py) meeting through a FileStore. FSDP2 (`fully_shard`
   per layer and the root: Shard(0)) and tensor parallel (ColwiseParallel Shard(0),
   RowwiseParallel Shard(1) with its bias Replicate, LayerNorms Replicate), each over many
   small (100 x Linear(16)), medium (100 x Linear(256)), a few large (8 x Linear(1024))
   tensors and a TransformerEncoder stack. Every optimizer steps its own copy with the same
   gradients assigned once; interleaved round-robin on each rank (a barrier before every
   timed step); reports per optimizer the slower rank's median (+ IQR), each torch
   variant's over ours, the number of DTensor parameters and their placements, and each
   optimizer's parameter gap to torch for-loop after all steps (~0: it made the update).
   Not part of --profile gpu-check (it runs on the CPU whatever --device says).

--profile gpu-check is a short GPU profile for benchmarks/gpu_check.sh (well under a
minute on an H100): the iteration section on the small (--quick) models; steps of flat
1e6, 1e7 and 1e8, transformer-shaped stacks of ~1e6 and ~1e8 parameters and 200 tiny
tensors; clip + step on the largest stack; the low-byte variants on flat 1e7 and 1e8 and the
~1e8 stack. Tensors are made on the device. With any
profile, every row is printed to stderr and appended to <out>/rows.md as soon as it is
measured, so a run stopped by a timeout keeps what it measured:

    python benchmarks/bench_step.py --device cuda --profile gpu-check --out DIR

If the installed noam_ext has no FusedAdamW.clip_grad_norm_, the clipping rows (and
only those) are skipped, with a note on stderr, in the tables and in the JSON.

Prints markdown tables (iterations first, then steps, then clip + step, then the low-byte
variants, then distributed), writes them and JSON to --out and, with matplotlib, PNG charts
(<stem>.png for steps, <stem>_iteration.png for iterations, <stem>_clip.png for clip + step,
<stem>_low_bytes.png for the low-byte variants, <stem>_distributed.png for the distributed
section).

    python benchmarks/bench_step.py            # full run on the CPU (about 10-15 minutes)
    python benchmarks/bench_step.py --quick    # seconds; CI's smoke test
    python benchmarks/bench_step.py --only iteration --iterations 50
    python benchmarks/bench_step.py --only low-bytes
    python benchmarks/bench_step.py --only distributed
    python benchmarks/bench_step.py --device cuda

The code lives in benchmarks/benchlib/, one module per job: config (the optimizers compared
and their settings), timer, iteration (section 1), step (sections 2 and 3), low_bytes
(section 4), distributed and distributed_worker (section 5), report (tables and JSON), rows (rows.md as measured)
and charts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from benchlib import report
from benchlib.charts import plot_clip, plot_distributed, plot_iterations, plot_low_bytes, plot_steps
from benchlib.config import CLIP_MAX_NORM, clip_unavailable
from benchlib.distributed import distributed_unavailable, run_distributed
from benchlib.iteration import run_iterations
from benchlib.low_bytes import run_low_bytes
from benchlib.report import machine_info, markdown
from benchlib.rows import RowLog
from benchlib.step import run_steps

SECTIONS = ("iteration", "step", "low-bytes", "distributed")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="a seconds-long subset (CI smoke test)")
    parser.add_argument("--profile", choices=["gpu-check"], default=None,
                        help="gpu-check: the short profile of benchmarks/gpu_check.sh (see above)")
    parser.add_argument("--only", choices=SECTIONS, default=None,
                        help="run only the whole-iteration, the step-only, the low-byte or the distributed "
                             "benchmark")
    parser.add_argument("--iterations", type=int, default=None,
                        help="measured iterations (distributed and low-bytes: steps) per candidate and model "
                             "(default 25; 10 with --quick and --profile gpu-check)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="warm-up iterations per candidate, not measured (default 5; 3 with --quick and "
                             "--profile gpu-check)")
    parser.add_argument("--min-run-time", type=float, default=None,
                        help="seconds per step measurement (default 1.0; 0.05 with --quick, 0.2 with --profile "
                             "gpu-check)")
    parser.add_argument("--max-params", type=float, default=None,
                        help="skip step and low-byte layouts of more parameters than this (e.g. 2e6)")
    parser.add_argument("--clip-max-norm", type=float, default=CLIP_MAX_NORM,
                        help=f"max_norm of the gradient-clipping rows (default {CLIP_MAX_NORM}; the iteration "
                             "models' gradient norms are below 1, so clipping is active there only below them)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args(argv)
    gpu_check = args.profile == "gpu-check"
    if args.quick and gpu_check:
        parser.error("--quick and --profile gpu-check are two different profiles: give one")
    if gpu_check and args.only == "distributed":
        parser.error("--profile gpu-check has no distributed section")
    if args.min_run_time is None:
        args.min_run_time = 0.05 if args.quick else 0.2 if gpu_check else 1.0
    if args.iterations is None:
        args.iterations = 10 if args.quick or gpu_check else 25
    if args.warmup is None:
        args.warmup = 3 if args.quick or gpu_check else 5
    if args.iterations < 1 or args.warmup < 0:
        parser.error("--iterations must be >= 1 and --warmup >= 0")
    if not args.clip_max_norm > 0:
        parser.error("--clip-max-norm must be > 0")
    if args.max_params is not None and not args.max_params >= 1:
        parser.error("--max-params must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available")
    sections = [args.only] if args.only else [s for s in SECTIONS if not (gpu_check and s == "distributed")]
    args.clip_skipped = clip_unavailable()
    if args.clip_skipped is not None:
        print(f"NOTE: {args.clip_skipped}.", file=sys.stderr, flush=True)
    distributed_skipped = distributed_unavailable() if "distributed" in sections else None
    if distributed_skipped is not None:
        print(f"NOTE: distributed section skipped: {distributed_skipped}.", file=sys.stderr, flush=True)
    info = machine_info(args.device)
    rows = RowLog(args.out / "rows.md", info, " ".join(["python", "benchmarks/bench_step.py"] + sys.argv[1:]))
    iterations = run_iterations(args, rows.iteration) if "iteration" in sections else []
    steps = run_steps(args, rows.step, rows.clip) if "step" in sections else []
    low_bytes = run_low_bytes(args, rows.low_bytes) if "low-bytes" in sections else []
    distributed, distributed_failure = [], None
    if "distributed" in sections and distributed_skipped is None:
        distributed, distributed_failure = run_distributed(args, rows.distributed)
    table = markdown(info, iterations, steps, args.clip_skipped, distributed, distributed_failure,
                     distributed_skipped, low_bytes)
    print(table)
    stem = f"bench_{args.device}{'_quick' if args.quick else '_gpu_check' if gpu_check else ''}"
    payload = report.payload(info, iterations, steps, args.clip_skipped, distributed, distributed_failure,
                             distributed_skipped, low_bytes)
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    (args.out / f"{stem}.md").write_text(table + "\n")
    charts = ((plot_iterations, iterations, f"{stem}_iteration.png"), (plot_steps, steps, f"{stem}.png"),
              (plot_clip, steps, f"{stem}_clip.png"), (plot_low_bytes, low_bytes, f"{stem}_low_bytes.png"),
              (plot_distributed, distributed, f"{stem}_distributed.png"))
    for plot, results, name in charts:
        path = args.out / name
        if plot(results, path):
            print(f"chart: {path}", file=sys.stderr)
        elif name.endswith(("_clip.png", "_low_bytes.png", "_distributed.png")):
            path.unlink(missing_ok=True)   # no such rows this run: no stale chart from an earlier one
    print(f"results: {args.out / f'{stem}.json'}", file=sys.stderr)
    print(f"rows as measured: {args.out / 'rows.md'}", file=sys.stderr)
    if args.clip_skipped is not None:
        print(f"NOTE: {args.clip_skipped}.", file=sys.stderr)
    if distributed_failure is not None:
        print(f"ERROR: the distributed section did not finish:\n{distributed_failure}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

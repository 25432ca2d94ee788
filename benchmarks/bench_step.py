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
   layout's step alone: ours `optimizer.clip_grad_norm_(1.0); optimizer.step()`, torch
   `torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True); optimizer.step()` (+ the
   scheduler) for each AdamW variant, gradients assigned once as above (randn: norm
   ~sqrt(params), so clipping is active; torch's in-place scaling leaves its gradients
   at norm ~1 after the first call, which does not change its work). Effective
   bandwidth counts 32 bytes per parameter for ours (the norm reads the gradient, 28
   for the step) and 40 for torch (4 norm + 8 to scale the gradient in place + 28).

If the installed noam_ext has no FusedAdamW.clip_grad_norm_, the clipping rows (and
only those) are skipped, with a note on stderr, in the tables and in the JSON.

Prints markdown tables (iterations first, then steps, then clip + step), writes them
and JSON to --out and, with matplotlib, PNG charts (<stem>.png for steps,
<stem>_iteration.png for iterations, <stem>_clip.png for clip + step).

    python benchmarks/bench_step.py            # full run on the CPU (about 10-15 minutes)
    python benchmarks/bench_step.py --quick    # seconds; CI's smoke test
    python benchmarks/bench_step.py --only iteration --iterations 50
    python benchmarks/bench_step.py --device cuda

The code lives in benchmarks/benchlib/, one module per job: config (the optimizers compared
and their settings), timer, iteration (section 1), step (sections 2 and 3), report (tables
and JSON) and charts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from benchlib import report
from benchlib.charts import plot_clip, plot_iterations, plot_steps
from benchlib.config import CLIP_MAX_NORM, clip_unavailable
from benchlib.iteration import run_iterations
from benchlib.report import machine_info, markdown
from benchlib.step import run_steps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="a seconds-long subset (CI smoke test)")
    parser.add_argument("--only", choices=["iteration", "step"], default=None,
                        help="run only the whole-iteration or only the step-only benchmark")
    parser.add_argument("--iterations", type=int, default=None,
                        help="measured iterations per candidate and model (default 25; 10 with --quick)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="warm-up iterations per candidate, not measured (default 5; 3 with --quick)")
    parser.add_argument("--min-run-time", type=float, default=None, help="seconds per step measurement")
    parser.add_argument("--clip-max-norm", type=float, default=CLIP_MAX_NORM,
                        help=f"max_norm of the gradient-clipping rows (default {CLIP_MAX_NORM}; the iteration "
                             "models' gradient norms are below 1, so clipping is active there only below them)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args(argv)
    if args.min_run_time is None:
        args.min_run_time = 0.05 if args.quick else 1.0
    if args.iterations is None:
        args.iterations = 10 if args.quick else 25
    if args.warmup is None:
        args.warmup = 3 if args.quick else 5
    if args.iterations < 1 or args.warmup < 0:
        parser.error("--iterations must be >= 1 and --warmup >= 0")
    if not args.clip_max_norm > 0:
        parser.error("--clip-max-norm must be > 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available")
    args.clip_skipped = clip_unavailable()
    if args.clip_skipped is not None:
        print(f"NOTE: {args.clip_skipped}.", file=sys.stderr, flush=True)
    iterations = run_iterations(args) if args.only != "step" else []
    steps = run_steps(args) if args.only != "iteration" else []
    info = machine_info(args.device)
    table = markdown(info, iterations, steps, args.clip_skipped)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_{args.device}{'_quick' if args.quick else ''}"
    payload = report.payload(info, iterations, steps, args.clip_skipped)
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    (args.out / f"{stem}.md").write_text(table + "\n")
    for plotted, path in ((plot_iterations(iterations, args.out / f"{stem}_iteration.png"),
                           args.out / f"{stem}_iteration.png"),
                          (plot_steps(steps, args.out / f"{stem}.png"), args.out / f"{stem}.png"),
                          (plot_clip(steps, args.out / f"{stem}_clip.png"), args.out / f"{stem}_clip.png")):
        if plotted:
            print(f"chart: {path}", file=sys.stderr)
        elif path.name.endswith("_clip.png"):
            path.unlink(missing_ok=True)   # no clip + step rows this run: no stale chart from an earlier one
    print(f"results: {args.out / f'{stem}.json'}", file=sys.stderr)
    if args.clip_skipped is not None:
        print(f"NOTE: {args.clip_skipped}.", file=sys.stderr)


if __name__ == "__main__":
    main()
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
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import noam_ext

BYTES_PER_PARAM = 28  # float32, no amsgrad: 4 reads + 3 writes of 4 bytes
D_MODEL, WARMUP = 512, 4000
OURS = "noam_ext"
TORCH_PEERS = (("torch for-loop", dict(foreach=False)), ("torch foreach", dict(foreach=True)),
               ("torch fused", dict(fused=True)))
FUSED = "torch fused"
NO_STEP = "fwd+bwd only"
ZERO_GRADS = ("optimizer.zero_grad()", "model.zero_grad()")
# Small enough that clipping is active in every row (the iteration models' gradient norms
# are 0.01-0.5): an inactive clip would let ours skip the multiply that torch still makes.
CLIP_MAX_NORM = 0.01
CLIP_LABEL = "with clip_grad_norm_"
CLIP_ZERO_GRAD = "optimizer.zero_grad()"   # the one zeroing variant timed with clipping
CLIP_BYTES_OURS = 32    # read the gradient for the norm (4) + the step's 28
CLIP_BYTES_TORCH = 40   # the norm (4) + scale the gradient in place (read + write, 8) + the step's 28
CLIP_MIN_PARAMS = 900_000  # clip + step layouts in a full run: the ~1e6 ones up (the transformer "1.0M"
                           # stack has 991,360); --quick: every flat and transformer one


def clip_unavailable() -> str | None:
    """None when the installed noam_ext has FusedAdamW.clip_grad_norm_, else why the
    clipping rows are skipped."""
    try:
        noam_ext.FusedAdamW.clip_grad_norm_
    except AttributeError:
        return (f"the installed noam_ext ({Path(noam_ext.__file__).parent}) has no FusedAdamW.clip_grad_norm_ "
                f"(AttributeError), so the '{CLIP_LABEL}' iteration rows and the 'clip + step' table are skipped")
    return None


def clip_bytes(peer: str) -> int:
    return CLIP_BYTES_OURS if peer == OURS else CLIP_BYTES_TORCH


def torch_clip(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)


def adamw_kwargs() -> dict:
    return dict(lr=1.0, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.01)


@dataclass
class Timing:
    median_s: float
    iqr_s: float
    runs: int


def quartiles(times: list[float]) -> Timing:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return Timing(statistics.median(times), q[2] - q[0], len(times))


# ==== 1. whole training iterations ==========================================================

@dataclass
class ModelSpec:
    kind: str                                   # "mlp" or "transformer"
    name: str
    build: Callable[[], torch.nn.Module]
    input_shape: tuple[int, ...]                # the fixed batch fed to every candidate
    batch: str                                  # the batch, in words


def mlp(width: int, layers: int) -> torch.nn.Module:
    """`layers` x Linear(width, width) with a ReLU between consecutive layers."""
    modules: list[torch.nn.Module] = []
    for i in range(layers):
        modules.append(torch.nn.Linear(width, width))
        if i < layers - 1:
            modules.append(torch.nn.ReLU())
    return torch.nn.Sequential(*modules)


def encoder(d_model: int, nhead: int, ff: int, layers: int) -> torch.nn.Module:
    layer = torch.nn.TransformerEncoderLayer(d_model=d_model, nhead=nhead, dim_feedforward=ff, batch_first=True)
    return torch.nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)


def iteration_models(quick: bool) -> list[ModelSpec]:
    """Batches chosen so that one iteration takes tens of ms on a 2-core CPU (a few ms in --quick)."""
    if quick:
        width, depth, rows = 512, 4, 16
        d, nhead, ff, layers, batch, seq = 128, 4, 512, 2, 4, 16
    else:
        width, depth, rows = 2048, 8, 16
        d, nhead, ff, layers, batch, seq = 512, 8, 2048, 4, 2, 32
    return [
        ModelSpec("mlp", f"MLP {depth} x Linear({width}, {width})", lambda: mlp(width, depth),
                  (rows, width), f"{rows} x {width}"),
        ModelSpec("transformer", f"TransformerEncoder {layers} x (d={d}, heads={nhead}, ff={ff})",
                  lambda: encoder(d, nhead, ff, layers), (batch, seq, d), f"{batch} x {seq} tokens"),
    ]


class Candidate:
    """One model copy and its optimizer; `iteration()` is the timed training iteration."""

    def __init__(self, name: str, model: torch.nn.Module, zero_grad: str, x: torch.Tensor, y: torch.Tensor,
                 rng: tuple, clip: float | None = None):
        self.name, self.model, self.x, self.y = name, model, x, y
        self.rng = rng                       # this candidate's own dropout RNG stream
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        self.clip: Callable[[], torch.Tensor] | None = None   # between backward and step
        self.norm: torch.Tensor | None = None                 # what the last clip returned
        self.norms: list[torch.Tensor] = []                   # ... in every measured iteration
        if name == OURS:
            self.optimizer = noam_ext.FusedAdamW(model.parameters(), **adamw_kwargs(),
                                                 schedule=noam_ext.Noam(D_MODEL, WARMUP))
        elif name != NO_STEP:
            flags = dict(TORCH_PEERS)[name]
            self.optimizer = torch.optim.AdamW(model.parameters(), **adamw_kwargs(), **flags)
            self.scheduler = noam_ext.TransformerLRScheduler(self.optimizer, d_model=D_MODEL, warmup_steps=WARMUP)
        if clip is not None and name == OURS:
            self.clip = lambda opt=self.optimizer: opt.clip_grad_norm_(clip)
        elif clip is not None and name != NO_STEP:
            self.clip = lambda params=list(model.parameters()): torch_clip(params, clip)
        if zero_grad == "optimizer.zero_grad()" and self.optimizer is not None:
            self.zero_grad = self.optimizer.zero_grad
        else:   # model.zero_grad(), and the reference without an optimizer (same as torch's zero_grad)
            self.zero_grad = model.zero_grad

    def iteration(self) -> None:
        self.zero_grad()
        loss = F.mse_loss(self.model(self.x), self.y)
        loss.backward()
        if self.clip is not None:
            self.norm = self.clip()   # kept as a tensor: no host sync inside the timed iteration
        if self.optimizer is not None:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()


def get_rng(device: str) -> tuple:
    return (torch.get_rng_state(), torch.cuda.get_rng_state() if device == "cuda" else None)


def set_rng(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


@dataclass
class IterationResult:
    kind: str
    model: str
    params: int
    tensors: int
    batch: str
    zero_grad: str
    warmup: int
    iterations: int
    timings: dict = field(default_factory=dict)      # candidate -> Timing
    times_s: dict = field(default_factory=dict)      # candidate -> every measured iteration, in order
    param_gap: dict = field(default_factory=dict)    # candidate -> ||p - p_for_loop|| / ||p_for_loop - p_0||
    clip_max_norm: float | None = None               # None: no clipping; else every optimizer clipped
    clip_norms: dict = field(default_factory=dict)   # candidate -> gradient norm its last clip returned
    clip_active: dict = field(default_factory=dict)  # candidate -> fraction of measured iterations with norm > max_norm

    def clip_activity(self) -> str:
        """Whether clipping changed the gradients in the measured iterations (by ours' norms)."""
        active = self.clip_active.get(OURS, float("nan"))
        return "active" if active == 1 else "inactive" if active == 0 else f"active in {100 * active:.0f}%"

    def clip_state(self) -> str:
        activity = self.clip_activity()
        return (f"max_norm {self.clip_max_norm}, norm {self.clip_norms.get(OURS, float('nan')):.3g}: "
                + (activity if activity == "active" else f"**{activity}**"))

    @property
    def clipped(self) -> bool:
        return self.clip_max_norm is not None

    def ratio(self, peer: str) -> float:
        """peer's median over ours: > 1 means ours is faster."""
        return self.timings[peer].median_s / self.timings[OURS].median_s

    def paired_ratio(self, peer: str) -> float:
        """Median over rounds of peer's time over ours in the same round (neighbours in
        time): less sensitive to drift in machine speed than the ratio of medians."""
        return statistics.median(p / o for p, o in zip(self.times_s[peer], self.times_s[OURS]))


def parameter_gaps(initial: list[torch.Tensor], candidates: list[Candidate]) -> dict:
    """How far each optimizer's parameters ended from torch for-loop's, relative to how far
    torch for-loop moved them: all saw the same data and dropout masks, so a healthy
    optimizer ends near 0 (rounding only) and one that skipped updates near 1."""
    trained = {c.name: [p.detach().float().cpu() for p in c.model.parameters()]
               for c in candidates if c.optimizer is not None}
    reference = trained.get("torch for-loop")
    if reference is None:
        return {}
    moved = sum(float((r - p0).pow(2).sum()) for r, p0 in zip(reference, initial)) ** 0.5
    return {name: (sum(float((p - r).pow(2).sum()) for p, r in zip(params, reference)) ** 0.5) / max(moved, 1e-30)
            for name, params in trained.items()}


def time_training(spec: ModelSpec, zero_grad: str, device: str, warmup: int, iterations: int,
                  seed: int = 0, clip: float | None = None) -> IterationResult:
    torch.manual_seed(seed)
    base = spec.build().to(device)
    x = torch.randn(spec.input_shape, device=device)
    with torch.no_grad():
        y = torch.randn_like(base(x))
    initial = [p.detach().float().cpu().clone() for p in base.parameters()]
    rng = get_rng(device)
    names = [OURS] + [label for label, _ in TORCH_PEERS] + [NO_STEP]
    # Each candidate trains its own deep copy of the same initial model.
    candidates = [Candidate(name, copy.deepcopy(base), zero_grad, x, y, rng, clip) for name in names]
    del base
    result = IterationResult(spec.kind, spec.name, sum(p.numel() for p in candidates[0].model.parameters()),
                             len(list(candidates[0].model.parameters())), spec.batch, zero_grad, warmup, iterations,
                             clip_max_norm=clip)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {c.name: [] for c in candidates}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()   # as timeit does: no collector pauses inside a timed iteration
    try:
        for r in range(warmup + iterations):
            shift = r % len(candidates)
            for c in candidates[shift:] + candidates[:shift]:   # round-robin, rotating who goes first
                set_rng(c.rng)
                sync()
                start = time.perf_counter()
                c.iteration()
                sync()
                elapsed = time.perf_counter() - start
                c.rng = get_rng(device)
                if r >= warmup:
                    times[c.name].append(elapsed)
                    if c.norm is not None:
                        c.norms.append(c.norm)
    finally:
        if gc_was_enabled:
            gc.enable()
    for name, ts in times.items():
        result.timings[name] = quartiles(ts)
        result.times_s[name] = ts
    result.param_gap = parameter_gaps(initial, candidates)
    result.clip_norms = {c.name: float(c.norm) for c in candidates if c.norm is not None}
    result.clip_active = {c.name: sum(float(n) > clip for n in c.norms) / len(c.norms)
                          for c in candidates if c.norms}
    return result


def run_iterations(args) -> list[IterationResult]:
    results = []
    specs = iteration_models(args.quick)
    variants = [(zero_grad, None) for zero_grad in ZERO_GRADS]
    if args.clip_skipped is None:
        variants.append((CLIP_ZERO_GRAD, args.clip_max_norm))
    total = len(specs) * len(variants)
    index = 0
    for spec in specs:
        for zero_grad, clip in variants:
            index += 1
            what = zero_grad if clip is None else f"{zero_grad}, {CLIP_LABEL}(max_norm={clip})"
            print(f"[iteration {index}/{total}] {spec.name}, batch {spec.batch}, {what}",
                  file=sys.stderr, flush=True)
            result = time_training(spec, zero_grad, args.device, args.warmup, args.iterations, clip=clip)
            for name, t in result.timings.items():
                ratio = f"  ({result.ratio(name):.2f}x ours)" if name not in (OURS, NO_STEP) else ""
                print(f"    {name:<20} {t.median_s * 1e3:10.2f} ms{ratio}", file=sys.stderr, flush=True)
            if result.clipped:
                print("    gradient norm at the last iteration: "
                      + ", ".join(f"{n} {v:.4g}" for n, v in result.clip_norms.items()), file=sys.stderr, flush=True)
                if result.clip_active.get(OURS, 0) < 1:
                    print(f"    NOTE: clipping {result.clip_activity()} here (gradient norm "
                          f"{result.clip_norms.get(OURS, float('nan')):.3g} vs max_norm {clip}): the factor is 1 in "
                          "those iterations; a smaller --clip-max-norm makes it active", file=sys.stderr, flush=True)
            bad = {n: g for n, g in result.param_gap.items() if not g < 0.05}
            if bad:
                print(f"    WARNING: parameters far from torch for-loop's after training: {bad}",
                      file=sys.stderr, flush=True)
            results.append(result)
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
    return results


# ==== 2. one optimizer step =================================================================

def transformer_shapes(d_model: int, layers: int) -> list[tuple[int, ...]]:
    """Parameter shapes of `layers` torch.nn.TransformerEncoderLayer(d_model, ff=4*d_model)."""
    d, ff = d_model, 4 * d_model
    per_layer = [(3 * d, d), (3 * d,), (d, d), (d,), (ff, d), (ff,), (d, ff), (d,), (d,), (d,), (d,), (d,)]
    return per_layer * layers


def layouts(quick: bool, device: str, memory_bytes: int) -> list[tuple[str, str, str, list[tuple[int, ...]]]]:
    """(kind, name, stack, shapes) of every case to run; `stack` pairs a transformer-shaped
    case with its flat-view twin."""
    cases = []
    flat_sizes = [10**5, 10**6] if quick else [10**5, 10**6, 10**7, 10**8]
    for n in flat_sizes:
        # Each optimizer holds params, grads and two moments: 16 bytes per element, two at a time.
        if 2 * 16 * n * 1.5 < memory_bytes:
            cases.append(("flat", f"flat {n:.0e}", "", [(n,)]))
    stacks = [(128, 5)] if quick else [(128, 5), (256, 13), (512, 32)]   # ~1e6, ~1e7, ~1e8
    for kind in ("transformer", "flat-view"):
        for d, layers in stacks:
            shapes = transformer_shapes(d, layers)
            n = sum(torch.Size(s).numel() for s in shapes)
            if 2 * 16 * n * 1.5 < memory_bytes:
                what = "tensors" if kind == "transformer" else "views of one buffer"
                cases.append((kind, f"{kind} {n / 1e6:.1f}M ({len(shapes)} {what})", f"d{d} x {layers}", shapes))
    for count in ([200] if quick else [20, 200]):
        cases.append(("small", f"{count} tensors x 5", "", [(5,)] * count))
    return cases


def carve(buffer: torch.Tensor, shapes) -> list[torch.Tensor]:
    """Consecutive views of `buffer` with the given shapes."""
    views, offset = [], 0
    for s in shapes:
        n = torch.Size(s).numel()
        views.append(buffer[offset:offset + n].view(s))
        offset += n
    return views


def make_params(shapes, device, flat_views: bool = False, seed: int = 0) -> list[torch.nn.Parameter]:
    """The same values for every peer; with flat_views, every parameter is a view into one
    contiguous buffer (nn.Parameter shares the storage of the view it wraps)."""
    generator = torch.Generator().manual_seed(seed)
    if flat_views:
        total = sum(torch.Size(s).numel() for s in shapes)
        buffer = torch.randn(total, generator=generator).to(device)
        return [torch.nn.Parameter(v) for v in carve(buffer, shapes)]
    return [torch.nn.Parameter(torch.randn(s, generator=generator).to(device)) for s in shapes]


def give_grads(params, flat_views: bool = False, seed: int = 1) -> None:
    """Gradients as autograd leaves them, the same for every peer: `p.grad = tensor`, set
    once and left in place for every step (as a loop that zeroes with set_to_none=False
    keeps them). With flat_views they are views into one contiguous gradient buffer, as
    in a flat (ZeRO-style) layout. Never anything of an optimizer's own."""
    generator = torch.Generator().manual_seed(seed)
    device = params[0].device
    if flat_views:
        total = sum(p.numel() for p in params)
        grads = carve(torch.randn(total, generator=generator).to(device), [p.shape for p in params])
    else:
        grads = [torch.randn(p.shape, generator=generator).to(device) for p in params]
    for p, g in zip(params, grads):
        p.grad = g


def build_peers(shapes, device, flat_views: bool = False):
    """name -> zero-argument step function, each with its own parameters and gradients."""
    peers = {}
    params = make_params(shapes, device, flat_views)
    give_grads(params, flat_views)
    ours = noam_ext.FusedAdamW(params, **adamw_kwargs(), schedule=noam_ext.Noam(D_MODEL, WARMUP))
    peers[OURS] = ours.step
    for label, flags in TORCH_PEERS:
        params = make_params(shapes, device, flat_views)
        give_grads(params, flat_views)
        opt = torch.optim.AdamW(params, **adamw_kwargs(), **flags)
        sched = noam_ext.TransformerLRScheduler(opt, d_model=D_MODEL, warmup_steps=WARMUP)

        def step(opt=opt, sched=sched):
            opt.step()
            sched.step()
        peers[label] = step
    if device == "cpu":
        try:  # optional peer, never required
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            params = make_params(shapes, device, flat_views)
            give_grads(params, flat_views)
            ds = DeepSpeedCPUAdam(params, lr=1e-3, betas=(0.9, 0.98), eps=1e-9, adamw_mode=True)
            peers["DeepSpeed CPU Adam"] = ds.step
        except Exception:  # noqa: BLE001  (not installed, or its extension cannot build here)
            pass
    return peers


def build_clip_peers(shapes, device, max_norm: float):
    """name -> zero-argument "clip + step" function, each with its own parameters and
    gradients (assigned once, as in build_peers). torch's clip scales the gradients in
    place, so after the first call its gradients have norm ~max_norm and later calls
    scale them by ~1; that is the same work (torch multiplies by the clamped factor
    unconditionally). Ours leaves the gradients as they are and its step applies the
    factor, so every call clips by ~max_norm / sqrt(numel)."""
    peers = {}
    params = make_params(shapes, device)
    give_grads(params)
    ours = noam_ext.FusedAdamW(params, **adamw_kwargs(), schedule=noam_ext.Noam(D_MODEL, WARMUP))

    def ours_clip_step(opt=ours):
        opt.clip_grad_norm_(max_norm)
        opt.step()
    peers[OURS] = ours_clip_step
    for label, flags in TORCH_PEERS:
        params = make_params(shapes, device)
        give_grads(params)
        opt = torch.optim.AdamW(params, **adamw_kwargs(), **flags)
        sched = noam_ext.TransformerLRScheduler(opt, d_model=D_MODEL, warmup_steps=WARMUP)

        def clip_step(params=params, opt=opt, sched=sched):
            torch_clip(params, max_norm)
            opt.step()
            sched.step()
        peers[label] = clip_step
    return peers


def wants_clip_step(kind: str, params: int, quick: bool) -> bool:
    return kind in ("flat", "transformer") and (quick or params >= CLIP_MIN_PARAMS)


# ---- timing -------------------------------------------------------------------------------

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


def ceiling_gbps(total_params: int, device: str, timer, min_run_time: float) -> float:
    """Memory ceiling for a pass that moves as many bytes as the update."""
    if device == "cpu":
        # In-place read-modify-write of 3.5 floats per parameter: 8 bytes each = 28 bytes.
        buf = torch.ones(max(1, int(total_params * 3.5)))
        timing = timer(lambda: buf.mul_(1.0), min_run_time)
        moved = buf.numel() * 8
    else:
        src = torch.ones(max(1, total_params * 7 // 2), device=device)
        dst = torch.empty_like(src)
        timing = timer(lambda: dst.copy_(src), min_run_time)
        moved = src.numel() * 8
    return moved / timing.median_s / 1e9


@dataclass
class CaseResult:
    kind: str
    name: str
    params: int
    tensors: int
    ceiling_gbps: float
    stack: str = ""
    timings: dict = field(default_factory=dict)        # peer -> Timing
    clip_timings: dict = field(default_factory=dict)   # peer -> Timing of clip + step (empty: not measured)
    clip_max_norm: float | None = None

    def gbps(self, peer: str) -> float:
        return BYTES_PER_PARAM * self.params / self.timings[peer].median_s / 1e9

    def clip_gbps(self, peer: str) -> float:
        return clip_bytes(peer) * self.params / self.clip_timings[peer].median_s / 1e9

    def clip_ratio(self, peer: str) -> float:
        """peer's clip + step median over ours: > 1 means ours is faster."""
        return self.clip_timings[peer].median_s / self.clip_timings[OURS].median_s

    def clip_over_step(self, peer: str) -> float:
        """clip + step over the step alone, same peer and layout: what clipping adds."""
        return self.clip_timings[peer].median_s / self.timings[peer].median_s


def run_steps(args) -> list[CaseResult]:
    device = args.device
    timer = time_cpu if device == "cpu" else time_cuda
    if device == "cpu":
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        memory = torch.cuda.get_device_properties(0).total_memory
    results = []
    cases = layouts(args.quick, device, memory)
    for index, (kind, name, stack, shapes) in enumerate(cases, 1):
        n = sum(torch.Size(s).numel() for s in shapes)
        print(f"[step {index}/{len(cases)}] {name}: {n:,} parameters", file=sys.stderr, flush=True)
        result = CaseResult(kind, name, n, len(shapes), ceiling_gbps(n, device, timer, args.min_run_time), stack)
        peers = build_peers(shapes, device, flat_views=kind == "flat-view")
        for peer, fn in peers.items():
            result.timings[peer] = timer(fn, args.min_run_time)
            print(f"    {peer:<20} {result.timings[peer].median_s * 1e6:12.1f} us", file=sys.stderr, flush=True)
        del peers, fn   # free this layout's optimizers before the clip + step ones are built
        if args.clip_skipped is None and wants_clip_step(kind, n, args.quick):
            gc.collect()
            result.clip_max_norm = args.clip_max_norm
            for peer, fn in build_clip_peers(shapes, device, args.clip_max_norm).items():
                result.clip_timings[peer] = timer(fn, args.min_run_time)
                print(f"    {peer + ' clip+step':<30} {result.clip_timings[peer].median_s * 1e6:12.1f} us",
                      file=sys.stderr, flush=True)
            del fn
        results.append(result)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


# ==== reporting =============================================================================

def machine_info(device: str) -> dict:
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "noam_ext": noam_ext.build_info(),
        "threads": torch.get_num_threads(),
    }
    if device == "cpu":
        model = platform.processor()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        info["cpu"] = model
        info["cores"] = os.cpu_count()
    else:
        info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_line(info: dict) -> str:
    where = info.get("cpu") or info.get("gpu")
    return (f"Machine: {where}, {info['device']}, {info['threads']} threads, torch {info['torch']}, "
            f"noam_ext CPU capability {info['noam_ext'].get('cpu_capability', '?')}, {info['date']}")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.2f} ms"


def iteration_markdown(results: list[IterationResult]) -> str:
    peers = [label for label, _ in TORCH_PEERS]
    first = results[0]
    lines = [
        f"### Whole training iteration (zero_grad + forward + backward + step), median of {first.iterations} "
        f"after {first.warmup} warm-up, interleaved round-robin",
        "",
        "| model | params | tensors | batch | zero_grad | noam_ext | "
        + " | ".join(f"{p} (x slower)" for p in peers) + f" | ours vs torch fused | {NO_STEP} |",
        "|---|---:|---:|---|---|---:|" + "---:|" * len(peers) + "---:|---:|",
    ]
    for r in results:
        ours = r.timings[OURS]
        cells = [f"{ms(r.timings[p].median_s)} ({r.ratio(p):.2f}x)" for p in peers]
        zero_grad = f"`{r.zero_grad}`" + (f", **{CLIP_LABEL}** ({r.clip_state()})" if r.clipped else "")
        lines.append(
            f"| {r.model} | {r.params:,} | {r.tensors} | {r.batch} | {zero_grad} | "
            f"{ms(ours.median_s)} (IQR {ours.iqr_s * 1e3:,.2f}) | " + " | ".join(cells)
            + f" | **{r.ratio(FUSED):.2f}x** | {ms(r.timings[NO_STEP].median_s)} |")
    lines += ["", "Each cell: median time of one whole iteration (torch also runs TransformerLRScheduler.step()); "
              "in brackets that median over ours (> 1: ours is faster). "
              f"'{NO_STEP}': the same iteration (zeroing with model.zero_grad()) without optimizer or step, for scale. "
              "Every optimizer trains its own copy of the model from the same initial weights with AdamW "
              "(lr 1.0 x Noam(512, 4000), betas (0.9, 0.98), eps 1e-9, weight decay 0.01)."]
    clipped = [r for r in results if r.clipped]
    if clipped:
        norms = "; ".join(f"{r.kind}: ours {r.clip_norms.get(OURS, float('nan')):.4g}, torch for-loop "
                          f"{r.clip_norms.get('torch for-loop', float('nan')):.4g}" for r in clipped)
        lines += ["", f"Rows '{CLIP_LABEL}': gradient clipping between backward and step, for every optimizer: ours "
                  f"`optimizer.clip_grad_norm_(max_norm)` (computes the norm; the step applies "
                  f"min(1, max_norm / (norm + 1e-6)) as it reads each gradient), torch "
                  f"`torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)` (the norm, then every gradient "
                  f"scaled in place) before `optimizer.step()`; '{NO_STEP}' does not clip. Clipping is active when the "
                  "norm exceeds max_norm; when it does not, the factor is 1 (torch still multiplies every gradient "
                  f"by it). Gradient norm returned at the last measured iteration: {norms}."]
    return "\n".join(lines)


def clip_markdown(info: dict, results: list[CaseResult]) -> str:
    rows = [r for r in results if r.clip_timings]
    peers = [p for p, _ in TORCH_PEERS]
    lines = [
        f"### Clip + step (gradient clipping to max_norm {rows[0].clip_max_norm}, then one optimizer step)",
        "",
        f"| layout | params | tensors | noam_ext clip + step | GB/s ({CLIP_BYTES_OURS} B) | % of ceiling | "
        + " | ".join(f"{p} (x slower)" for p in peers)
        + f" | {FUSED} GB/s ({CLIP_BYTES_TORCH} B) | clip + step over step alone: ours / {FUSED} |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(peers) + "---:|---:|",
    ]
    for r in rows:
        ours = r.clip_timings[OURS]
        cells = [f"{r.clip_timings[p].median_s * 1e6:,.0f} us ({r.clip_ratio(p):.2f}x)" for p in peers]
        lines.append(
            f"| {r.name} | {r.params:,} | {r.tensors} | {ours.median_s * 1e6:,.1f} us (IQR {ours.iqr_s * 1e6:,.1f}) | "
            f"{r.clip_gbps(OURS):.1f} | {100 * r.clip_gbps(OURS) / r.ceiling_gbps:.0f}% of {r.ceiling_gbps:.1f} | "
            + " | ".join(cells)
            + f" | {r.clip_gbps(FUSED):.1f} | {r.clip_over_step(OURS):.2f}x / {r.clip_over_step(FUSED):.2f}x |")
    lines += ["", "Ours: `optimizer.clip_grad_norm_(max_norm); optimizer.step()` (the step applies the clipping "
              "factor as it reads each gradient; the gradients are not modified). Torch: "
              "`torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True); optimizer.step()` (+ "
              "TransformerLRScheduler.step()) for each AdamW variant. Gradients are assigned once as "
              "`p.grad = tensor` (randn, norm ~ sqrt(params) >> max_norm, so clipping is active) and left in place: "
              "torch's clip scales them in place, so after its first call their norm is ~max_norm and later calls "
              "scale by ~1, which is the same work (torch multiplies by the clamped factor unconditionally). "
              f"Effective GB/s counts {CLIP_BYTES_OURS} bytes per float32 parameter for ours (4 to read the gradient "
              f"for the norm + the step's 28) and {CLIP_BYTES_TORCH} for torch (4 for the norm + 8 to scale the "
              "gradient in place + 28); the ceiling is the one measured for the same layout in the step table. "
              "Last column: each optimizer's clip + step median over its own step-alone median in the step table "
              "(same layout, same run): what clipping adds."]
    return "\n".join(lines)


def step_markdown(info: dict, results: list[CaseResult]) -> str:
    peers = [p for p in results[0].timings if p != OURS]
    lines = [
        "### One optimizer step",
        "",
        "| layout | params | tensors | noam_ext | GB/s | % of ceiling | "
        + " | ".join(f"{p} (x slower)" for p in peers) + " |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(peers),
    ]
    for r in results:
        ours = r.timings[OURS]
        cells = [f"{r.timings[p].median_s * 1e6:,.0f} us ({r.timings[p].median_s / ours.median_s:.2f}x)"
                 for p in peers]
        lines.append(
            f"| {r.name} | {r.params:,} | {r.tensors} | {ours.median_s * 1e6:,.1f} us "
            f"(IQR {ours.iqr_s * 1e6:,.1f}) | {r.gbps(OURS):.1f} | "
            f"{100 * r.gbps(OURS) / r.ceiling_gbps:.0f}% of {r.ceiling_gbps:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "Times are medians of one step (plus TransformerLRScheduler.step() for torch), with gradients "
              "assigned once as `p.grad = tensor` and left in place; GB/s counts 28 bytes per float32 parameter; "
              "the ceiling is "
              + ("an in-place read-modify-write pass" if info["device"] == "cpu" else "a device copy")
              + " over as many bytes, measured in the same run."]
    pairs = [(r, twin) for r in results if r.kind == "transformer"
             for twin in results if twin.kind == "flat-view" and twin.stack == r.stack]
    if pairs:
        shown = [p for p in (OURS, FUSED) if p in results[0].timings]
        lines += ["", "Flat parameter layout against separate tensors (same shapes; step time of separate "
                  "tensors over that of flat views: > 1 means the flat layout is faster):", "",
                  "| stack | params | " + " | ".join(f"{p}: separate / flat views" for p in shown) + " |",
                  "|---|---:|" + "---:|" * len(shown)]
        for r, twin in pairs:
            cells = [f"{r.timings[p].median_s * 1e6:,.0f} / {twin.timings[p].median_s * 1e6:,.0f} us "
                     f"({r.timings[p].median_s / twin.timings[p].median_s:.2f}x)" for p in shown]
            lines.append(f"| {r.stack} ({r.tensors} tensors) | {r.params:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(info: dict, iterations: list[IterationResult], steps: list[CaseResult],
             clip_skipped: str | None = None) -> str:
    parts = [machine_line(info)]
    if clip_skipped is not None:
        parts.append(f"**Gradient-clipping rows skipped:** {clip_skipped}.")
    if iterations:
        parts.append(iteration_markdown(iterations))
    if steps:
        parts.append(step_markdown(info, steps))
    if any(r.clip_timings for r in steps):
        parts.append(clip_markdown(info, steps))
    return "\n\n".join(parts)


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_steps(results: list[CaseResult], path: Path) -> bool:
    plt = _pyplot()
    if plt is None or not results:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind, marker in (("flat", "o"), ("transformer", "s"), ("flat-view", "^")):
        rows = [r for r in results if r.kind == kind]
        if not rows:
            continue
        xs = [r.params for r in rows]
        left.plot(xs, [r.gbps(OURS) for r in rows], marker=marker, label=f"noam_ext, {kind}")
        left.plot(xs, [r.ceiling_gbps for r in rows], marker=marker, linestyle=":", color="grey",
                  label=f"ceiling, {kind}")
        for peer in rows[0].timings:
            if peer != OURS:
                right.plot(xs, [r.timings[peer].median_s / r.timings[OURS].median_s for r in rows],
                           marker=marker, label=f"{peer}, {kind}")
    left.set(xscale="log", xlabel="parameters", ylabel="GB/s (28 B per parameter)",
             title="noam_ext step bandwidth")
    right.set(xscale="log", yscale="log", xlabel="parameters", ylabel="peer time / noam_ext time",
              title="one step: how much slower each peer is")
    right.axhline(1.0, color="black", linewidth=0.8)
    left.legend(fontsize=7)
    right.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_iterations(results: list[IterationResult], path: Path) -> bool:
    plt = _pyplot()
    if plt is None or not results:
        return False
    labels = [f"{r.kind} {r.params / 1e6:.1f}M\n{r.zero_grad}" + ("\n+ clip_grad_norm_" if r.clipped else "")
              for r in results]
    peers = [label for label, _ in TORCH_PEERS]
    names = [OURS] + peers + [NO_STEP]
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(results))]
        medians, below, above = [], [], []
        for r in results:
            ts = r.times_s[name]
            q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
            med = r.timings[name].median_s
            medians.append(med * 1e3)
            below.append(max(0.0, med - q[0]) * 1e3)
            above.append(max(0.0, q[2] - med) * 1e3)
        left.bar(xs, medians, width, yerr=[below, above], capsize=2, label=name, color=colors[name],
                 hatch="//" if name == NO_STEP else None, alpha=0.6 if name == NO_STEP else 1.0)
    left.set_xticks(range(len(results)), labels, fontsize=7)
    left.set(ylabel="ms per iteration (median; whiskers: quartiles)", title="whole training iteration")
    left.legend(fontsize=7)
    width = 0.8 / len(peers)
    for j, peer in enumerate(peers):
        xs = [i + (j - (len(peers) - 1) / 2) * width for i in range(len(results))]
        ratios = [r.ratio(peer) for r in results]
        bars = right.bar(xs, ratios, width, label=f"{peer} / noam_ext", color=colors[peer],
                         edgecolor="black" if peer == FUSED else None, linewidth=1.2 if peer == FUSED else 0)
        if peer == FUSED:
            for bar, ratio in zip(bars, ratios):
                right.annotate(f"{ratio:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                               ha="center", va="bottom", fontsize=7, fontweight="bold")
    right.axhline(1.0, color="black", linewidth=0.8)
    right.set_xticks(range(len(results)), labels, fontsize=7)
    right.set(ylabel="torch median / noam_ext median (> 1: ours faster)",
              title="iteration time over noam_ext's (target: torch fused >= 1.0x)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_clip(results: list[CaseResult], path: Path) -> bool:
    """Clip + step: each torch variant's time over ours per layout (bars), with the same
    ratio for the step alone (black ticks) for comparison."""
    plt = _pyplot()
    rows = [r for r in results if r.clip_timings]
    if plt is None or not rows:
        return False
    from matplotlib.ticker import FuncFormatter
    peers = [p for p, _ in TORCH_PEERS]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(rows) + 2), 4.5))
    width = 0.8 / len(peers)
    for j, peer in enumerate(peers):
        xs = [i + (j - (len(peers) - 1) / 2) * width for i in range(len(rows))]
        ratios = [r.clip_ratio(peer) for r in rows]
        bars = ax.bar(xs, ratios, width, label=f"{peer} / noam_ext, clip + step", color=f"C{j + 1}",
                      edgecolor="black" if peer == FUSED else None, linewidth=1.2 if peer == FUSED else 0)
        ax.scatter(xs, [r.timings[peer].median_s / r.timings[OURS].median_s for r in rows], marker="_", s=200,
                   color="black", zorder=3, label="same, step alone" if j == 0 else None)
        if peer == FUSED:
            for bar, ratio in zip(bars, ratios):
                ax.annotate(f"{ratio:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7, fontweight="bold")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)), [r.name.replace(" (", "\n(") for r in rows], fontsize=7)
    ax.set(yscale="log", ylabel="torch median / noam_ext median (> 1: ours faster)",
           title=f"clip_grad_norm_(max_norm={rows[0].clip_max_norm}) + step:\nhow much slower each torch AdamW is")
    ratio_labels = FuncFormatter(lambda v, _: f"{v:g}x")
    ax.yaxis.set_major_formatter(ratio_labels)
    ax.yaxis.set_minor_formatter(ratio_labels)
    ax.tick_params(axis="y", which="both", labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


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
    payload = {
        "machine": info,
        "clip_skipped": args.clip_skipped,   # None when the clipping rows were measured
        "iteration": [
            {**{k: v for k, v in asdict(r).items() if k not in ("timings", "times_s")},
             "timings": {p: asdict(t) for p, t in r.timings.items()},
             "ratios_over_ours": {p: r.ratio(p) for p, _ in TORCH_PEERS},
             "ours_vs_torch_fused": r.ratio(FUSED),
             "paired_ratios_over_ours": {p: r.paired_ratio(p) for p, _ in TORCH_PEERS},
             "times_s": r.times_s} for r in iterations],
        "results": [
            {**{k: v for k, v in asdict(r).items() if k not in ("timings", "clip_timings", "clip_max_norm")},
             "timings": {p: asdict(t) for p, t in r.timings.items()},
             "noam_ext_gbps": r.gbps(OURS)} for r in steps],
        "clip_step": [
            {"kind": r.kind, "name": r.name, "params": r.params, "tensors": r.tensors, "stack": r.stack,
             "max_norm": r.clip_max_norm, "ceiling_gbps": r.ceiling_gbps,
             "timings": {p: asdict(t) for p, t in r.clip_timings.items()},
             "ratios_over_ours": {p: r.clip_ratio(p) for p, _ in TORCH_PEERS},
             "bytes_per_param": {p: clip_bytes(p) for p in r.clip_timings},
             "gbps": {p: r.clip_gbps(p) for p in r.clip_timings},
             "over_step_alone": {p: r.clip_over_step(p) for p in r.clip_timings}}
            for r in steps if r.clip_timings],
    }
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

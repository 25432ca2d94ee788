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
   (>= 1.0x).

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

Prints markdown tables (iterations first, then steps), writes them and JSON to --out
and, with matplotlib, two PNG charts (<stem>.png for steps, <stem>_iteration.png for
iterations).

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
                 rng: tuple):
        self.name, self.model, self.x, self.y = name, model, x, y
        self.rng = rng                       # this candidate's own dropout RNG stream
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        if name == OURS:
            self.optimizer = noam_ext.FusedAdamW(model.parameters(), **adamw_kwargs(),
                                                 schedule=noam_ext.Noam(D_MODEL, WARMUP))
        elif name != NO_STEP:
            flags = dict(TORCH_PEERS)[name]
            self.optimizer = torch.optim.AdamW(model.parameters(), **adamw_kwargs(), **flags)
            self.scheduler = noam_ext.TransformerLRScheduler(self.optimizer, d_model=D_MODEL, warmup_steps=WARMUP)
        if zero_grad == "optimizer.zero_grad()" and self.optimizer is not None:
            self.zero_grad = self.optimizer.zero_grad
        else:   # model.zero_grad(), and the reference without an optimizer (same as torch's zero_grad)
            self.zero_grad = model.zero_grad

    def iteration(self) -> None:
        self.zero_grad()
        loss = F.mse_loss(self.model(self.x), self.y)
        loss.backward()
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
                  seed: int = 0) -> IterationResult:
    torch.manual_seed(seed)
    base = spec.build().to(device)
    x = torch.randn(spec.input_shape, device=device)
    with torch.no_grad():
        y = torch.randn_like(base(x))
    initial = [p.detach().float().cpu().clone() for p in base.parameters()]
    rng = get_rng(device)
    names = [OURS] + [label for label, _ in TORCH_PEERS] + [NO_STEP]
    # Each candidate trains its own deep copy of the same initial model.
    candidates = [Candidate(name, copy.deepcopy(base), zero_grad, x, y, rng) for name in names]
    del base
    result = IterationResult(spec.kind, spec.name, sum(p.numel() for p in candidates[0].model.parameters()),
                             len(list(candidates[0].model.parameters())), spec.batch, zero_grad, warmup, iterations)
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
    finally:
        if gc_was_enabled:
            gc.enable()
    for name, ts in times.items():
        result.timings[name] = quartiles(ts)
        result.times_s[name] = ts
    result.param_gap = parameter_gaps(initial, candidates)
    return result


def run_iterations(args) -> list[IterationResult]:
    results = []
    specs = iteration_models(args.quick)
    total = len(specs) * len(ZERO_GRADS)
    index = 0
    for spec in specs:
        for zero_grad in ZERO_GRADS:
            index += 1
            print(f"[iteration {index}/{total}] {spec.name}, batch {spec.batch}, {zero_grad}",
                  file=sys.stderr, flush=True)
            result = time_training(spec, zero_grad, args.device, args.warmup, args.iterations)
            for name, t in result.timings.items():
                ratio = f"  ({result.ratio(name):.2f}x ours)" if name not in (OURS, NO_STEP) else ""
                print(f"    {name:<20} {t.median_s * 1e3:10.2f} ms{ratio}", file=sys.stderr, flush=True)
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
    timings: dict = field(default_factory=dict)   # peer -> Timing

    def gbps(self, peer: str) -> float:
        return BYTES_PER_PARAM * self.params / self.timings[peer].median_s / 1e9


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
        for peer, fn in build_peers(shapes, device, flat_views=kind == "flat-view").items():
            result.timings[peer] = timer(fn, args.min_run_time)
            print(f"    {peer:<20} {result.timings[peer].median_s * 1e6:12.1f} us", file=sys.stderr, flush=True)
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
        lines.append(
            f"| {r.model} | {r.params:,} | {r.tensors} | {r.batch} | `{r.zero_grad}` | "
            f"{ms(ours.median_s)} (IQR {ours.iqr_s * 1e3:,.2f}) | " + " | ".join(cells)
            + f" | **{r.ratio(FUSED):.2f}x** | {ms(r.timings[NO_STEP].median_s)} |")
    lines += ["", "Each cell: median time of one whole iteration (torch also runs TransformerLRScheduler.step()); "
              "in brackets that median over ours (> 1: ours is faster). "
              f"'{NO_STEP}': the same iteration (zeroing with model.zero_grad()) without optimizer or step, for scale. "
              "Every optimizer trains its own copy of the model from the same initial weights with AdamW "
              "(lr 1.0 x Noam(512, 4000), betas (0.9, 0.98), eps 1e-9, weight decay 0.01)."]
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


def markdown(info: dict, iterations: list[IterationResult], steps: list[CaseResult]) -> str:
    parts = [machine_line(info)]
    if iterations:
        parts.append(iteration_markdown(iterations))
    if steps:
        parts.append(step_markdown(info, steps))
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
    labels = [f"{r.kind} {r.params / 1e6:.1f}M\n{r.zero_grad}" for r in results]
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
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available")
    iterations = run_iterations(args) if args.only != "step" else []
    steps = run_steps(args) if args.only != "iteration" else []
    info = machine_info(args.device)
    table = markdown(info, iterations, steps)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_{args.device}{'_quick' if args.quick else ''}"
    payload = {
        "machine": info,
        "iteration": [
            {**{k: v for k, v in asdict(r).items() if k not in ("timings", "times_s")},
             "timings": {p: asdict(t) for p, t in r.timings.items()},
             "ratios_over_ours": {p: r.ratio(p) for p, _ in TORCH_PEERS},
             "ours_vs_torch_fused": r.ratio(FUSED),
             "paired_ratios_over_ours": {p: r.paired_ratio(p) for p, _ in TORCH_PEERS},
             "times_s": r.times_s} for r in iterations],
        "results": [
            {**{k: v for k, v in asdict(r).items() if k != "timings"},
             "timings": {p: asdict(t) for p, t in r.timings.items()},
             "noam_ext_gbps": r.gbps(OURS)} for r in steps],
    }
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    (args.out / f"{stem}.md").write_text(table + "\n")
    for plotted, path in ((plot_iterations(iterations, args.out / f"{stem}_iteration.png"),
                           args.out / f"{stem}_iteration.png"),
                          (plot_steps(steps, args.out / f"{stem}.png"), args.out / f"{stem}.png")):
        if plotted:
            print(f"chart: {path}", file=sys.stderr)
    print(f"results: {args.out / f'{stem}.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Section 1, whole training iterations: the models, one candidate per optimizer (its own
model copy, optimizer and dropout RNG stream), the round-robin run of all of them, and
the check that every optimizer really trained (param_gap)."""

from __future__ import annotations

import copy
import gc
import statistics
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

import noam_ext

from .config import (CLIP_LABEL, CLIP_ZERO_GRAD, D_MODEL, NO_STEP, OURS, TORCH_PEERS, WARMUP, ZERO_GRADS,
                     adamw_kwargs, torch_clip)
from .timer import quartiles, time_interleaved

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

    def before(c: Candidate) -> None:
        set_rng(c.rng)

    def after(c: Candidate, measured: bool) -> None:
        c.rng = get_rng(device)
        if measured and c.norm is not None:
            c.norms.append(c.norm)

    times = time_interleaved(candidates, Candidate.iteration, warmup, iterations, sync, before, after)
    for name, ts in times.items():
        result.timings[name] = quartiles(ts)
        result.times_s[name] = ts
    result.param_gap = parameter_gaps(initial, candidates)
    result.clip_norms = {c.name: float(c.norm) for c in candidates if c.norm is not None}
    result.clip_active = {c.name: sum(float(n) > clip for n in c.norms) / len(c.norms)
                          for c in candidates if c.norms}
    return result


def run_iterations(args, on_result: Callable[[IterationResult], None] | None = None) -> list[IterationResult]:
    """Every model and zeroing variant; on_result gets each result as soon as it is measured."""
    results = []
    specs = iteration_models(args.quick or args.profile == "gpu-check")
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
            if on_result is not None:
                on_result(result)
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
    return results


"""Sections 2 and 3, one optimizer step alone and clip + step: the parameter layouts,
parameters and gradients made the same for every peer, the peers' step functions, the
memory ceiling, and the run over every layout."""

from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

import noam_ext

from .config import (BYTES_PER_PARAM, CLIP_MIN_PARAMS, D_MODEL, OURS, TORCH_PEERS, WARMUP, adamw_kwargs,
                     clip_bytes, torch_clip)
from .timer import time_cpu, time_cuda

def transformer_shapes(d_model: int, layers: int) -> list[tuple[int, ...]]:
    """Parameter shapes of `layers` torch.nn.TransformerEncoderLayer(d_model, ff=4*d_model)."""
    d, ff = d_model, 4 * d_model
    per_layer = [(3 * d, d), (3 * d,), (d, d), (d,), (ff, d), (ff,), (d, ff), (d,), (d,), (d,), (d,), (d,)]
    return per_layer * layers


def layouts(quick: bool, device: str, memory_bytes: int,
            profile: str | None = None) -> list[tuple[str, str, str, list[tuple[int, ...]]]]:
    """(kind, name, stack, shapes) of every case to run; `stack` pairs a transformer-shaped
    case with its flat-view twin. The gpu-check profile: flat 1e6, 1e7, 1e8, the ~1e6 and
    ~1e8 transformer-shaped stacks (no flat views) and 200 tiny tensors."""
    cases = []
    if profile == "gpu-check":
        flat_sizes, stacks, kinds, small = [10**6, 10**7, 10**8], [(128, 5), (512, 32)], ("transformer",), [200]
    elif quick:
        flat_sizes, stacks, kinds, small = [10**5, 10**6], [(128, 5)], ("transformer", "flat-view"), [200]
    else:
        flat_sizes = [10**5, 10**6, 10**7, 10**8]
        stacks = [(128, 5), (256, 13), (512, 32)]   # ~1e6, ~1e7, ~1e8
        kinds, small = ("transformer", "flat-view"), [20, 200]
    for n in flat_sizes:
        # Each optimizer holds params, grads and two moments: 16 bytes per element, two at a time.
        if 2 * 16 * n * 1.5 < memory_bytes:
            cases.append(("flat", f"flat {n:.0e}", "", [(n,)]))
    for kind in kinds:
        for d, layers in stacks:
            shapes = transformer_shapes(d, layers)
            n = sum(torch.Size(s).numel() for s in shapes)
            if 2 * 16 * n * 1.5 < memory_bytes:
                what = "tensors" if kind == "transformer" else "views of one buffer"
                cases.append((kind, f"{kind} {n / 1e6:.1f}M ({len(shapes)} {what})", f"d{d} x {layers}", shapes))
    for count in small:
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
    """The same values for every peer, made on the device (a host randn of 1e8 elements per
    peer would take longer than the GPU measurements); with flat_views, every parameter is
    a view into one contiguous buffer (nn.Parameter shares the storage of the view it wraps)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    if flat_views:
        total = sum(torch.Size(s).numel() for s in shapes)
        buffer = torch.randn(total, generator=generator, device=device)
        return [torch.nn.Parameter(v) for v in carve(buffer, shapes)]
    return [torch.nn.Parameter(torch.randn(s, generator=generator, device=device)) for s in shapes]


def give_grads(params, flat_views: bool = False, seed: int = 1) -> None:
    """Gradients as autograd leaves them, the same for every peer: `p.grad = tensor`, set
    once and left in place for every step (as a loop that zeroes with set_to_none=False
    keeps them). With flat_views they are views into one contiguous gradient buffer, as
    in a flat (ZeRO-style) layout. Never anything of an optimizer's own."""
    device = params[0].device
    generator = torch.Generator(device=device).manual_seed(seed)
    if flat_views:
        total = sum(p.numel() for p in params)
        grads = carve(torch.randn(total, generator=generator, device=device), [p.shape for p in params])
    else:
        grads = [torch.randn(p.shape, generator=generator, device=device) for p in params]
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


def clip_cases(cases, args) -> set[str]:
    """Names of the layouts also timed with clip + step: in the gpu-check profile the largest
    transformer-shaped stack, otherwise as wants_clip_step says."""
    if args.profile == "gpu-check":
        stacks = [(sum(torch.Size(s).numel() for s in shapes), name)
                  for kind, name, _, shapes in cases if kind == "transformer"]
        return {max(stacks)[1]} if stacks else set()
    return {name for kind, name, _, shapes in cases
            if wants_clip_step(kind, sum(torch.Size(s).numel() for s in shapes), args.quick)}


def ceiling_buffers(floats: int, device: str) -> tuple[torch.Tensor, ...]:
    """The memory a ceiling pass over `floats` float32 values works on (see ceiling_pass)."""
    if device == "cpu":
        return (torch.ones(max(1, floats)),)
    src = torch.ones(max(1, floats), device=device)
    return (src, torch.empty_like(src))


def ceiling_pass(buffers: tuple[torch.Tensor, ...], floats: int) -> tuple[Callable[[], None], int]:
    """(pass, bytes it moves): a pass over the first `floats` values of `buffers` (from
    ceiling_buffers, of at least as many) that moves 8 bytes per value: on a CPU an
    in-place read-modify-write (a plain copy undercounts because of write-allocate
    traffic), on a GPU a device copy."""
    floats = max(1, floats)
    if len(buffers) == 1:
        buf = buffers[0][:floats]
        return (lambda: buf.mul_(1.0)), floats * 8
    src, dst = buffers[0][:floats], buffers[1][:floats]
    return (lambda: dst.copy_(src)), floats * 8


def ceiling_gbps(total_params: int, device: str, timer, min_run_time: float) -> float:
    """Memory ceiling for a pass that moves as many bytes as the update: 3.5 floats per
    parameter, 8 bytes each = 28 bytes."""
    floats = total_params * 7 // 2
    run, moved = ceiling_pass(ceiling_buffers(floats, device), floats)
    return moved / timer(run, min_run_time).median_s / 1e9


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


def run_steps(args, on_step: Callable[[CaseResult], None] | None = None,
              on_clip: Callable[[CaseResult], None] | None = None) -> list[CaseResult]:
    """Every layout's step (and, for some, clip + step); on_step and on_clip get each
    result as soon as its step, then its clip + step, is measured."""
    device = args.device
    timer = time_cpu if device == "cpu" else time_cuda
    if device == "cpu":
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        memory = torch.cuda.get_device_properties(0).total_memory
    results = []
    cases = layouts(args.quick, device, memory, args.profile)
    if args.max_params is not None:
        over = [name for _, name, _, shapes in cases if sum(torch.Size(s).numel() for s in shapes) > args.max_params]
        if over:
            print(f"NOTE: --max-params {args.max_params:g}: skipping {', '.join(over)}", file=sys.stderr, flush=True)
        cases = [c for c in cases if c[1] not in over]
    clipped = clip_cases(cases, args) if args.clip_skipped is None else set()
    for index, (kind, name, stack, shapes) in enumerate(cases, 1):
        n = sum(torch.Size(s).numel() for s in shapes)
        print(f"[step {index}/{len(cases)}] {name}: {n:,} parameters", file=sys.stderr, flush=True)
        result = CaseResult(kind, name, n, len(shapes), ceiling_gbps(n, device, timer, args.min_run_time), stack)
        peers = build_peers(shapes, device, flat_views=kind == "flat-view")
        for peer, fn in peers.items():
            result.timings[peer] = timer(fn, args.min_run_time)
            print(f"    {peer:<20} {result.timings[peer].median_s * 1e6:12.1f} us", file=sys.stderr, flush=True)
        del peers, fn   # free this layout's optimizers before the clip + step ones are built
        if on_step is not None:
            on_step(result)
        if name in clipped:
            gc.collect()
            result.clip_max_norm = args.clip_max_norm
            for peer, fn in build_clip_peers(shapes, device, args.clip_max_norm).items():
                result.clip_timings[peer] = timer(fn, args.min_run_time)
                print(f"    {peer + ' clip+step':<30} {result.clip_timings[peer].median_s * 1e6:12.1f} us",
                      file=sys.stderr, flush=True)
            del fn
            if on_clip is not None:
                on_clip(result)
        results.append(result)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


"""Section 4, fewer bytes per parameter (issue 17): one optimizer step of FusedAdamW with
each of its storage options (master weights, int16 remainders, bfloat16 moments, bfloat16
gradients, stochastic rounding) against torch fused AdamW on float32 and on bfloat16
parameters. Every variant, both peers and one ceiling pass per byte count (an in-place
read-modify-write on a CPU, a device copy on a GPU, over as many bytes as the variant
moves) run interleaved round-robin in one process, so drift in machine speed hits all
alike. The targets of the issue (CPU, from 1e7 elements) are checked per row."""

from __future__ import annotations

import gc
import os
import statistics
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

import noam_ext

from .config import D_MODEL, WARMUP, adamw_kwargs
from .step import ceiling_buffers, ceiling_pass, transformer_shapes
from .timer import quartiles, time_interleaved

F32, BF16 = torch.float32, torch.bfloat16
FUSED_F32 = "torch fused float32"
FUSED_BF16 = "torch fused bfloat16"
CEILING_TARGET = 0.9            # every variant at >= 90% of the ceiling for its own byte count
TARGET_MIN_ELEMENTS = 10**7     # the targets hold on the CPU from 1e7 elements
MEMORY_MARGIN = 1.25            # what a layout may use of the memory available, with room to spare


@dataclass(frozen=True)
class Variant:
    """One way of storing what a step reads and writes. `master`: None, "float32" or
    "remainder" (FusedAdamW's master_weights); `moment`: the moments' dtype (None: the
    optimizer's default, the parameter's dtype, or float32 with a master), or "8bit" (uint8
    codes with a float32 scale per 256 elements). `ceiling_target`: whether the issue's
    90%-of-the-ceiling target applies on the CPU (not to 8-bit moments, whose CPU step is
    bound by its arithmetic: benchmarks/eight_bit_step.py measures it against its floor)."""
    name: str
    param: torch.dtype
    grad: torch.dtype
    master: str | None = None
    moment: torch.dtype | None = None
    stochastic: bool = False
    torch_peer: bool = False                # torch.optim.AdamW(fused=True), not ours
    speedup_target: float | None = None     # torch fused float32's time over this one's, at least
    ceiling_target: bool = True

    @property
    def eight_bit(self) -> bool:
        return self.moment == "8bit"

    @property
    def moment_dtype(self) -> torch.dtype:
        if self.eight_bit:
            return torch.uint8
        if self.moment is not None:
            return self.moment
        return F32 if self.master is not None else self.param

    @property
    def bytes_per_element(self) -> int:
        """Bytes one step reads and writes per element, as the CPU loop (update_mixed) and
        torch's fused kernel access them: the parameter read and written (only written
        when a float32 master holds its value), the gradient read, both moments read and
        written, the master (float32 or int16 remainder) read and written."""
        p, g, m = (torch.empty((), dtype=d).element_size() for d in (self.param, self.grad, self.moment_dtype))
        param = p if self.master == "float32" else 2 * p
        master = {None: 0, "float32": 8, "remainder": 4}[self.master]
        return param + g + 4 * m + master

    @property
    def scale_bytes_per_element(self) -> float:
        """8-bit moments: the float32 scale of each moment's block of 256, read and written
        (4 x 4 B per 256 elements), beside bytes_per_element; 0 otherwise."""
        return 4 * 4 / 256 if self.eight_bit else 0.0

    @property
    def resident_bytes(self) -> float:
        """Bytes held per element: parameter, gradient, two moments (and their scales) and the master."""
        p, g, m = (torch.empty((), dtype=d).element_size() for d in (self.param, self.grad, self.moment_dtype))
        return p + g + 2 * m + self.scale_bytes_per_element / 2 + {None: 0, "float32": 4, "remainder": 2}[self.master]

    def options(self) -> dict:
        """FusedAdamW's keyword arguments for this storage (none for torch's own)."""
        options = {}
        if self.master is not None:
            options["master_weights"] = self.master
        if self.moment is not None:
            options["moment_dtype"] = self.moment
        if self.stochastic:
            options.update(stochastic_rounding=True, seed=0)
        return options


VARIANTS = (
    Variant("noam_ext float32", F32, F32),
    Variant("noam_ext float32, bf16 moments", F32, F32, moment=BF16),
    Variant("noam_ext float32, bf16 grads + moments", F32, BF16, moment=BF16),
    Variant("noam_ext bf16 + float32 master", BF16, BF16, master="float32"),
    Variant("noam_ext bf16 + remainder", BF16, BF16, master="remainder"),
    Variant("noam_ext bf16 + remainder, bf16 moments", BF16, BF16, master="remainder", moment=BF16,
            speedup_target=1.4),
    Variant("noam_ext bf16, round to nearest", BF16, BF16, speedup_target=1.7),
    Variant("noam_ext bf16, stochastic rounding", BF16, BF16, stochastic=True, speedup_target=1.7),
    Variant("noam_ext float32, 8-bit moments", F32, F32, moment="8bit", ceiling_target=False),
    Variant("noam_ext bf16, stochastic rounding, 8-bit moments", BF16, BF16, moment="8bit", stochastic=True,
            ceiling_target=False),
    Variant(FUSED_F32, F32, F32, torch_peer=True),
    Variant(FUSED_BF16, BF16, BF16, torch_peer=True),
)
PEERS = (FUSED_F32, FUSED_BF16)


def ceiling_name(nbytes: int) -> str:
    return f"ceiling {nbytes} B"


def layouts(args) -> list[tuple[str, str, list[tuple[int, ...]]]]:
    """(kind, name, shapes): flat 1e7 and 1e8 elements and transformer-shaped stacks (the
    step section's; the ~1e8 one in the gpu-check profile); --quick: flat 1e6 and the ~1e6
    stack."""
    if args.quick:
        flat, stacks = [10**6], [(128, 5)]
    elif args.profile == "gpu-check":
        flat, stacks = [10**7, 10**8], [(512, 32)]
    else:
        flat, stacks = [10**7, 10**8], [(256, 13), (512, 32)]
    cases = [("flat", f"flat {n:.0e}", [(n,)]) for n in flat]
    for d, depth in stacks:
        shapes = transformer_shapes(d, depth)
        n = sum(torch.Size(s).numel() for s in shapes)
        cases.append(("transformer", f"transformer {n / 1e6:.1f}M ({len(shapes)} tensors)", shapes))
    return cases


def available_memory(device: str) -> int:
    if device != "cpu":
        return torch.cuda.mem_get_info()[0]
    try:   # what can be allocated without pushing others out (the machine may be shared)
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_needed(elements: int, device: str) -> int:
    """Every variant's tensors at once (they run interleaved), the ceiling buffers, and the
    float32 values every variant's parameters and gradients are made from."""
    ceiling = max(v.bytes_per_element for v in VARIANTS) // 2 * (1 if device == "cpu" else 2)
    return elements * (sum(v.resident_bytes for v in VARIANTS) + ceiling + 8)


def assign_grad(p: torch.nn.Parameter, g: torch.Tensor) -> None:
    """p.grad = g, where g may have another dtype than p (a bfloat16 gradient of a float32
    parameter): torch >= 2.10 asks for p.grad_dtype to be set first; older torch takes it
    through .data."""
    if g.dtype != p.dtype:
        if hasattr(p, "grad_dtype"):
            p.grad_dtype = g.dtype
        else:
            p.grad = torch.zeros_like(p)
            p.grad.data = g
            return
    p.grad = g


def stored_dtypes(variant: Variant, optimizer: torch.optim.Optimizer, p: torch.Tensor) -> dict:
    """What a parameter and its state are stored in after a step, to check against the
    variant (an option the optimizer ignored would make the byte count wrong)."""
    state = optimizer.state[p]
    master = state.get("master_param", state.get("master_remainder"))
    exp_avg, exp_avg_sq = (state.get(key, state.get(f"{key}_codes")) for key in ("exp_avg", "exp_avg_sq"))
    return {"param": p.dtype, "grad": p.grad.dtype, "exp_avg": exp_avg.dtype,
            "exp_avg_sq": exp_avg_sq.dtype, "master": None if master is None else master.dtype}


def expected_dtypes(variant: Variant) -> dict:
    master = {None: None, "float32": F32, "remainder": torch.int16}[variant.master]
    return {"param": variant.param, "grad": variant.grad, "exp_avg": variant.moment_dtype,
            "exp_avg_sq": variant.moment_dtype, "master": master}


class Candidate:
    """What time_interleaved runs: a name and a zero-argument call."""

    def __init__(self, name: str, run: Callable[[], None]):
        self.name, self.run = name, run


def with_ceilings(candidates: list[Candidate], device: str, elements: int) -> list[Candidate]:
    """The variants with one ceiling pass per byte count among them, each right after the
    first variant of its byte count. The passes are views of one buffer (from its start), so
    no two of them are neighbours in the round-robin order (cyclic; the variants outnumber
    them): a pass never finds in the cache what the pass before it left there, any more than
    a variant does."""
    byte_counts = {}
    for c in candidates:
        byte_counts.setdefault(next(v for v in VARIANTS if v.name == c.name).bytes_per_element, c.name)
    if not byte_counts:
        return candidates
    buffers = ceiling_buffers(elements * max(byte_counts) // 8, device)
    ordered = []
    for c in candidates:
        ordered.append(c)
        for nbytes, first in byte_counts.items():
            if first == c.name:
                run, _ = ceiling_pass(buffers, elements * nbytes // 8)
                ordered.append(Candidate(ceiling_name(nbytes), run))
    return ordered


def build_variant(variant: Variant, values: list[torch.Tensor], grads: list[torch.Tensor]) -> Callable[[], None]:
    """The variant's step on its own parameters and gradients (copies of `values` and
    `grads` in its dtypes, gradients assigned once and left in place), after one step (state
    allocated; the stored dtypes checked)."""
    params = [torch.nn.Parameter(v.to(variant.param, copy=True)) for v in values]
    for p, g in zip(params, grads):
        assign_grad(p, g.to(variant.grad, copy=True))
    if variant.torch_peer:
        opt = torch.optim.AdamW(params, **adamw_kwargs(), fused=True)
        sched = noam_ext.TransformerLRScheduler(opt, d_model=D_MODEL, warmup_steps=WARMUP)

        def run(opt=opt, sched=sched):
            opt.step()
            sched.step()
    else:
        opt = noam_ext.FusedAdamW(params, **adamw_kwargs(), schedule=noam_ext.Noam(D_MODEL, WARMUP),
                                  **variant.options())
        run = opt.step
    run()
    stored, expected = stored_dtypes(variant, opt, params[0]), expected_dtypes(variant)
    if stored != expected:
        raise RuntimeError(f"{variant.name}: stored as {stored}, not {expected}: its byte count would be wrong")
    return run


@dataclass
class LowBytesResult:
    kind: str
    name: str
    params: int
    tensors: int
    device: str
    warmup: int
    iterations: int
    variants: list = field(default_factory=list)         # every Variant of the run, in order
    timings: dict = field(default_factory=dict)          # variant or ceiling name -> Timing
    times_s: dict = field(default_factory=dict)          # ... -> every measured round, in order
    skipped: dict = field(default_factory=dict)          # variant name -> why it did not run
    layout_skipped: str | None = None                    # why the whole layout did not run

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    def measured(self) -> list[Variant]:
        return [v for v in self.variants if v.name in self.timings]

    def gbps(self, name: str) -> float:
        v = self.variant(name)
        return (v.bytes_per_element + v.scale_bytes_per_element) * self.params / self.timings[name].median_s / 1e9

    def ceiling_gbps(self, nbytes: int) -> float:
        return nbytes * self.params / self.timings[ceiling_name(nbytes)].median_s / 1e9

    def fraction_of_ceiling(self, name: str) -> float:
        """GB/s over the ceiling for this variant's byte count, i.e. the ceiling pass's time
        over the variant's."""
        return self.gbps(name) / self.ceiling_gbps(self.variant(name).bytes_per_element)

    def ratio(self, peer: str, name: str) -> float | None:
        """peer's median over this variant's (> 1: the variant is faster); None when the
        peer did not run."""
        if peer not in self.timings:
            return None
        return self.timings[peer].median_s / self.timings[name].median_s

    def paired_ratio(self, peer: str, name: str) -> float | None:
        """Median over rounds of peer's time over the variant's in the same round."""
        if peer not in self.times_s:
            return None
        return statistics.median(p / t for p, t in zip(self.times_s[peer], self.times_s[name]))

    def targets_apply(self) -> str | None:
        """None when the issue's targets apply to this layout, else why not."""
        if self.device != "cpu":
            return "the targets are the CPU's"
        if self.params < TARGET_MIN_ELEMENTS:
            return f"below {TARGET_MIN_ELEMENTS:.0e} elements"
        return None

    def targets(self, name: str) -> list[dict]:
        """The issue's targets for this variant: each with its threshold, the value measured
        and whether it is met (None where the targets do not apply here)."""
        variant = self.variant(name)
        if variant.torch_peer or name not in self.timings:
            return []
        applies = self.targets_apply() is None
        found = [{"target": f">= {CEILING_TARGET:.0%} of the ceiling at {variant.bytes_per_element} B",
                  "threshold": CEILING_TARGET, "value": self.fraction_of_ceiling(name)}] if variant.ceiling_target else []
        if variant.speedup_target is not None:
            found.append({"target": f">= {variant.speedup_target}x the step time of {FUSED_F32}",
                          "threshold": variant.speedup_target, "value": self.ratio(FUSED_F32, name)})
        for t in found:
            t["met"] = (t["value"] is not None and t["value"] >= t["threshold"]) if applies else None
        return found


def skips_refused(device: str) -> bool:
    """Whether a variant that raises is skipped (its row says why) rather than stopping the
    run: on a GPU, where the options raise until the CUDA kernel runs them; not on the CPU,
    which runs every option, so that an error there is a bug."""
    return device != "cpu"


def time_layout(kind: str, name: str, shapes, args) -> LowBytesResult:
    device = args.device
    n = sum(torch.Size(s).numel() for s in shapes)
    result = LowBytesResult(kind, name, n, len(shapes), device, args.warmup, args.iterations, list(VARIANTS))
    needed, available = memory_needed(n, device), available_memory(device)
    if needed * MEMORY_MARGIN > available:
        result.layout_skipped = (f"not enough memory: every variant at once needs about {needed / 1e9:.1f} GB, "
                                 f"{available / 1e9:.1f} GB available")
        return result
    generator = torch.Generator(device=device).manual_seed(0)
    values = [torch.randn(s, generator=generator, device=device) for s in shapes]
    grads = [torch.randn(s, generator=generator, device=device) for s in shapes]
    candidates = []
    for variant in VARIANTS:
        try:
            candidates.append(Candidate(variant.name, build_variant(variant, values, grads)))
        except Exception as error:  # noqa: BLE001
            if not skips_refused(device):
                raise
            result.skipped[variant.name] = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            print(f"    {variant.name}: skipped: {result.skipped[variant.name]}", file=sys.stderr, flush=True)
    del values, grads
    candidates = with_ceilings(candidates, device, n)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = time_interleaved(candidates, lambda c: c.run(), args.warmup, args.iterations, sync)
    for label, ts in times.items():
        result.timings[label] = quartiles(ts)
        result.times_s[label] = ts
    return result


def run_low_bytes(args, on_result: Callable[[LowBytesResult], None] | None = None) -> list[LowBytesResult]:
    """Every layout; on_result gets each as soon as it is measured."""
    cases = layouts(args)
    if args.max_params is not None:
        over = [name for _, name, shapes in cases if sum(torch.Size(s).numel() for s in shapes) > args.max_params]
        if over:
            print(f"NOTE: --max-params {args.max_params:g}: skipping low-bytes {', '.join(over)}",
                  file=sys.stderr, flush=True)
        cases = [c for c in cases if c[1] not in over]
    results = []
    for index, (kind, name, shapes) in enumerate(cases, 1):
        n = sum(torch.Size(s).numel() for s in shapes)
        print(f"[low-bytes {index}/{len(cases)}] {name}: {n:,} elements", file=sys.stderr, flush=True)
        result = time_layout(kind, name, shapes, args)
        if result.layout_skipped is not None:
            print(f"    skipped: {result.layout_skipped}", file=sys.stderr, flush=True)
        for v in result.measured():
            fused = result.ratio(FUSED_F32, v.name)
            print(f"    {v.name:<42} {result.timings[v.name].median_s * 1e3:10.3f} ms  {v.bytes_per_element:2d} B  "
                  f"{result.gbps(v.name):7.1f} GB/s  {100 * result.fraction_of_ceiling(v.name):4.0f}% of ceiling"
                  + (f"  {fused:.2f}x {FUSED_F32}" if fused is not None else ""), file=sys.stderr, flush=True)
        results.append(result)
        if on_result is not None:
            on_result(result)
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return results

"""8-bit optimizer state (FusedAdamW(moment_dtype="8bit")) against its peers: one step on the CPU.

Candidates, interleaved round-robin in this one process (round r runs every candidate once,
starting with a different one each round, so drift in machine speed hits all alike):
  FusedAdamW float32 parameters: float32 moments, and 8-bit moments;
  FusedAdamW bfloat16 parameters with stochastic rounding and 8-bit moments;
  torch.optim.AdamW(fused=True) on float32 and on bfloat16 parameters (the issue's bars);
  optional peers, each skipped with a line saying why when it is not installed or fails:
  torchao.optim.AdamW8bit and bitsandbytes.optim.AdamW8bit (float32 and bfloat16
  parameters), DeepSpeed's DeepSpeedCPUAdam, and torch.optim.AdamW under torch.compile;
  and a ceiling pass over 16 bytes per element (the 8-bit step's own traffic, without the scales).
Layouts: one flat parameter of 10,000,128 elements (a multiple of 256) and transformer-shaped stacks
of ~1e7 (--quick: ~1e6).

Per candidate: median step time (and IQR), torch fused float32's and bfloat16's time over it,
state bytes per parameter (every tensor of optimizer.state except step, over the elements),
and the peak memory a step allocates beyond what it holds (the process's resident high-water
mark after one step, reset before it, less the resident size before it: an upper bound).
Then the compute floor of the 8-bit variants: one parameter small enough to stay in cache,
stepped many times (as benchmarks/compute_floor.py does for the other storages). And what a user
pays per training iteration: every candidate trains its own copy of the same TransformerEncoder
(forward, backward, step; interleaved the same way), beside the forward and backward alone.

    python benchmarks/eight_bit_step.py [--quick] [--iterations N] [--out DIR]

Writes eight_bit_step.md, .json and (with matplotlib) .png to --out (benchmarks/out).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import noam_ext
from benchlib.iteration import encoder
from benchlib.report import machine_info
from benchlib.step import ceiling_buffers, ceiling_pass, transformer_shapes
from benchlib.timer import quartiles, time_interleaved
from compute_floor import best_seconds_per_step   # (benchmarks/compute_floor.py)

F32, BF16 = torch.float32, torch.bfloat16
FUSED_F32, FUSED_BF16 = "torch fused float32", "torch fused bfloat16"
SPEED_BAR = 0.7   # the issue's: 8-bit >= 0.7x torch fused (float32; bfloat16 + SR against torch fused bfloat16)


@dataclass(frozen=True)
class Candidate:
    name: str
    param: torch.dtype
    make: Callable[[list], object]          # params -> an optimizer
    bytes_per_element: float | None = None  # what one step reads and writes, where counted
    bar_against: str | None = None          # the peer whose time * SPEED_BAR is the bar


def _fused(params, **options):
    return noam_ext.FusedAdamW(params, lr=1e-3, **options)


def _torch_fused(params):
    return torch.optim.AdamW(params, lr=1e-3, fused=True)


def _torchao(params):
    from torchao.optim import AdamW8bit
    return AdamW8bit(params, lr=1e-3)


def _bnb(params):
    import bitsandbytes as bnb
    return bnb.optim.AdamW8bit(params, lr=1e-3)


def _deepspeed(params):
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    return DeepSpeedCPUAdam(params, lr=1e-3, adamw_mode=True)


class _Compiled:
    """torch.optim.AdamW (foreach) with its step under torch.compile."""

    def __init__(self, params):
        self.inner = torch.optim.AdamW(params, lr=1e-3, foreach=True)
        self.state = self.inner.state
        self.step = torch.compile(self.inner.step, fullgraph=False)


SCALES = 16 / 256   # bytes per element of the scales: two float32 absmax per 256 elements, read and written

CANDIDATES = (
    Candidate("FusedAdamW float32", F32, lambda ps: _fused(ps), 28),
    Candidate("FusedAdamW float32, 8-bit moments", F32, lambda ps: _fused(ps, moment_dtype="8bit"),
              16 + SCALES, bar_against=FUSED_F32),
    Candidate("FusedAdamW bf16 + SR, 8-bit moments", BF16,
              lambda ps: _fused(ps, moment_dtype="8bit", stochastic_rounding=True, seed=0), 10 + SCALES,
              bar_against=FUSED_BF16),
    Candidate(FUSED_F32, F32, _torch_fused, 28),
    Candidate(FUSED_BF16, BF16, _torch_fused, 14),
    Candidate("torchao AdamW8bit float32", F32, _torchao),
    Candidate("bitsandbytes AdamW8bit float32", F32, _bnb),
    Candidate("torchao AdamW8bit bf16", BF16, _torchao),
    Candidate("bitsandbytes AdamW8bit bf16", BF16, _bnb),
    Candidate("DeepSpeedCPUAdam float32", F32, _deepspeed, 28),
    Candidate("torch.compile(AdamW.step) float32", F32, _Compiled, 28),
)
CEILING = "ceiling 16 B"


class Timed:
    def __init__(self, name: str, run: Callable[[], None]):
        self.name, self.run = name, run


def skip_reason(error: Exception) -> str:
    """Why an optional peer did not run, in one line."""
    line = (str(error).strip().splitlines() or [repr(error)])[0]
    return f"{type(error).__name__}: {line}"


def time_round_robin(candidates: list, args) -> tuple[dict, dict]:
    """Each candidate's run() timed interleaved (the peers' warnings silenced): times and medians."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times = time_interleaved(candidates, lambda t: t.run(), args.warmup, args.iterations)
    return times, {k: statistics.median(v) for k, v in times.items()}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao's 8-bit state) by its inner tensors."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def state_bytes(optimizer) -> int:
    return sum(tensor_bytes(t) for s in optimizer.state.values() for k, t in s.items()
               if isinstance(t, torch.Tensor) and k != "step")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def step_peak_bytes(step: Callable[[], None]) -> int | None:
    """The resident high-water mark one step reaches above the resident size before it (Linux:
    /proc/self/clear_refs resets the mark); None where that cannot be measured."""
    try:
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kb("VmRSS")
        step()
        peak = _status_kb("VmHWM")
    except OSError:
        return None
    return max(0, peak - before) * 1024 if before >= 0 and peak >= 0 else None


def layouts(quick: bool) -> list[tuple[str, list[tuple[int, ...]]]]:
    # Multiples of 256: torchao keeps a tensor whose size is not a multiple of its block in
    # float32 (silently), which would time another optimizer than its 8-bit one.
    n = 1_000_192 if quick else 10_000_128
    d, depth = (128, 5) if quick else (256, 13)
    shapes = transformer_shapes(d, depth)
    total = sum(torch.Size(s).numel() for s in shapes)
    return [(f"flat {n:.0e}", [(n,)]), (f"transformer {total / 1e6:.1f}M ({len(shapes)} tensors)", shapes)]


def build(candidate: Candidate, values, grads):
    params = [torch.nn.Parameter(v.to(candidate.param, copy=True)) for v in values]
    for p, g in zip(params, grads):
        p.grad = g.to(candidate.param, copy=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = candidate.make(params)
        optimizer.step()   # state allocated
    return optimizer


def run_layout(name: str, shapes, args) -> dict:
    generator = torch.Generator().manual_seed(0)
    values = [torch.randn(s, generator=generator) for s in shapes]
    grads = [torch.randn(s, generator=generator) for s in shapes]
    n = sum(v.numel() for v in values)
    print(f"[{name}] {n:,} elements", file=sys.stderr, flush=True)
    optimizers, skipped, peaks = {}, {}, {}
    for c in CANDIDATES:
        try:
            optimizers[c.name] = build(c, values, grads)
        except Exception as error:  # noqa: BLE001  (an optional peer missing or failing)
            skipped[c.name] = skip_reason(error)
            print(f"    {c.name}: skipped ({skipped[c.name]})", file=sys.stderr, flush=True)
    for c in CANDIDATES:   # one step each, alone, for its memory
        if c.name in optimizers:
            peaks[c.name] = step_peak_bytes(optimizers[c.name].step)
    timed = [Timed(c.name, optimizers[c.name].step) for c in CANDIDATES if c.name in optimizers]
    buffers = ceiling_buffers(n * 16 // 8, "cpu")
    ceiling, _ = ceiling_pass(buffers, n * 16 // 8)
    timed.insert(1, Timed(CEILING, ceiling))
    times, medians = time_round_robin(timed, args)
    rows = []
    for c in CANDIDATES:
        if c.name not in optimizers:
            rows.append({"name": c.name, "skipped": skipped[c.name]})
            continue
        q = quartiles(times[c.name])
        row = {"name": c.name, "param": str(c.param).removeprefix("torch."), "median_ms": q.median_s * 1e3,
               "iqr_ms": q.iqr_s * 1e3,
               "vs_fused_f32": medians.get(FUSED_F32, float("nan")) / medians[c.name],
               "vs_fused_bf16": medians.get(FUSED_BF16, float("nan")) / medians[c.name],
               "state_bytes_per_param": state_bytes(optimizers[c.name]) / n,
               "step_peak_mb": None if peaks.get(c.name) is None else peaks[c.name] / 1e6}
        if c.bytes_per_element is not None:
            row["bytes_per_element"] = c.bytes_per_element
            row["gbps"] = c.bytes_per_element * n / (medians[c.name]) / 1e9
        if c.bar_against is not None and c.bar_against in medians:
            row["bar"] = f">= {SPEED_BAR}x {c.bar_against}"
            row["bar_met"] = medians[c.bar_against] / medians[c.name] >= SPEED_BAR
        rows.append(row)
        print(f"    {c.name:<40} {row['median_ms']:9.2f} ms  {row['vs_fused_f32']:6.3f}x fused f32  "
              f"{row['state_bytes_per_param']:5.2f} B/param state", file=sys.stderr, flush=True)
    ceiling_gbps = 16 * n / medians[CEILING] / 1e9
    return {"layout": name, "elements": n, "tensors": len(shapes), "rows": rows, "ceiling_16B_gbps": ceiling_gbps}


NO_STEP = "forward + backward only"


class TrainingCopy:
    """A candidate's own copy of the model (in its parameter dtype) and optimizer; run() is one
    training iteration: zero the gradients, forward, MSE loss, backward, step."""

    def __init__(self, name: str, model: torch.nn.Module, dtype: torch.dtype, make, x, y):
        self.name, self.model = name, model.to(dtype)
        self.x, self.y = x.to(dtype), y.to(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.optimizer = make(list(self.model.parameters())) if make is not None else None

    def run(self) -> None:
        self.model.zero_grad()
        torch.nn.functional.mse_loss(self.model(self.x), self.y).backward()
        if self.optimizer is not None:
            self.optimizer.step()


def run_iteration(args) -> dict:
    """Every candidate training its own copy of one TransformerEncoder, interleaved; and the
    forward and backward alone (float32 and bfloat16) for the step's share."""
    import copy

    d, nhead, ff, layers, batch, seq = (128, 4, 512, 2, 4, 16) if args.quick else (512, 8, 2048, 4, 2, 32)
    torch.manual_seed(0)
    base = encoder(d, nhead, ff, layers)
    base.train(False)   # no dropout: every copy computes the same thing
    x = torch.randn(batch, seq, d)
    with torch.no_grad():
        y = torch.randn_like(base(x))
    n = sum(p.numel() for p in base.parameters())
    name = f"TransformerEncoder {layers} x (d={d}, heads={nhead}, ff={ff}), {n / 1e6:.1f}M parameters, " \
           f"batch {batch} x {seq} tokens"
    print(f"[iteration] {name}", file=sys.stderr, flush=True)
    copies, skipped = [], {}
    for c in CANDIDATES:
        try:
            copies.append(TrainingCopy(c.name, copy.deepcopy(base), c.param, c.make, x, y))
            copies[-1].run()   # state allocated (and anything compiled)
        except Exception as error:  # noqa: BLE001  (an optional peer missing or failing)
            skipped[c.name] = skip_reason(error)
            if copies and copies[-1].name == c.name:
                copies.pop()
            print(f"    {c.name}: skipped ({skipped[c.name]})", file=sys.stderr, flush=True)
    for dtype in (F32, BF16):
        copies.append(TrainingCopy(f"{NO_STEP}, {str(dtype).removeprefix('torch.')}", copy.deepcopy(base), dtype,
                                   None, x, y))
    times, medians = time_round_robin(copies, args)
    rows = []
    for c in CANDIDATES:
        if c.name not in medians:
            rows.append({"name": c.name, "skipped": skipped.get(c.name, "not run")})
            continue
        q = quartiles(times[c.name])
        alone = medians[f"{NO_STEP}, {str(c.param).removeprefix('torch.')}"]
        rows.append({"name": c.name, "param": str(c.param).removeprefix("torch."), "median_ms": q.median_s * 1e3,
                     "iqr_ms": q.iqr_s * 1e3,
                     "vs_fused_f32": medians.get(FUSED_F32, float("nan")) / medians[c.name],
                     "vs_fused_bf16": medians.get(FUSED_BF16, float("nan")) / medians[c.name],
                     "step_share": max(0.0, 1 - alone / medians[c.name])})
        print(f"    {c.name:<40} {q.median_s * 1e3:9.2f} ms per iteration  {rows[-1]['vs_fused_f32']:6.3f}x "
              "torch fused f32's", file=sys.stderr, flush=True)
    for dtype in ("float32", "bfloat16"):
        q = quartiles(times[f"{NO_STEP}, {dtype}"])
        rows.append({"name": f"{NO_STEP}, {dtype}", "param": dtype, "median_ms": q.median_s * 1e3,
                     "iqr_ms": q.iqr_s * 1e3})
    return {"model": name, "parameters": n, "rows": rows}


def compute_floor(elements: int, repeats: int) -> list[dict]:
    """Each 8-bit variant (and float32 for scale) on one in-cache parameter: best ns/element."""
    out = []
    for c in CANDIDATES[:3]:
        ns = best_seconds_per_step(c.make, c.param, c.param, elements, repeats) / elements * 1e9
        out.append({"name": c.name, "ns_per_element": ns, "bytes_per_element": c.bytes_per_element,
                    "most_it_can_stream_gbps": c.bytes_per_element / ns})
    return out


def iteration_markdown(iteration: dict) -> list[str]:
    lines = [f"### One training iteration: {iteration['model']}", "",
             "Each candidate trains its own copy (zero_grad, forward, MSE loss, backward, step), interleaved. "
             "Step share: 1 - (forward + backward alone) / iteration, in the parameters' dtype.", "",
             "| optimizer | params | ms per iteration (median) | IQR | vs torch fused f32 | vs torch fused bf16 | "
             "step share |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in iteration["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['name']} | | skipped: {r['skipped']} | | | | |")
        elif "vs_fused_f32" not in r:
            lines.append(f"| {r['name']} | {r['param']} | {r['median_ms']:.2f} | {r['iqr_ms']:.2f} | | | |")
        else:
            lines.append(f"| {r['name']} | {r['param']} | {r['median_ms']:.2f} | {r['iqr_ms']:.2f} | "
                         f"{r['vs_fused_f32']:.3f}x | {r['vs_fused_bf16']:.3f}x | {100 * r['step_share']:.0f}% |")
    return lines + [""]


def markdown(info: dict, layouts_run: list[dict], floor: list[dict], iteration: dict | None = None) -> str:
    lines = [f"8-bit optimizer state, one step on the CPU ({info.get('cpu', '')}, {info['threads']} threads, "
             f"torch {info['torch']}, {info['date']})", ""]
    for layout in layouts_run:
        lines += [f"### {layout['layout']}: {layout['elements']:,} elements, {layout['tensors']} tensors "
                  f"(ceiling at 16 B/element: {layout['ceiling_16B_gbps']:.1f} GB/s)", "",
                  "| optimizer | params | ms (median) | IQR | vs torch fused f32 | vs torch fused bf16 | "
                  "state B/param | step peak MB | GB/s | bar |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in layout["rows"]:
            if "skipped" in r:
                lines.append(f"| {r['name']} | | skipped: {r['skipped']} | | | | | | | |")
                continue
            peak = "" if r["step_peak_mb"] is None else f"{r['step_peak_mb']:.1f}"
            gbps = f"{r['gbps']:.1f}" if "gbps" in r else ""
            bar = f"{r['bar']}: {'met' if r['bar_met'] else 'NOT met'}" if "bar" in r else ""
            lines.append(f"| {r['name']} | {r['param']} | {r['median_ms']:.2f} | {r['iqr_ms']:.2f} | "
                         f"{r['vs_fused_f32']:.3f}x | {r['vs_fused_bf16']:.3f}x | {r['state_bytes_per_param']:.2f} | "
                         f"{peak} | {gbps} | {bar} |")
        lines.append("")
    lines += ["### Compute floor (one in-cache parameter)", "",
              "| variant | bytes/element | ns/element in cache | the most it can stream |", "|---|---:|---:|---:|"]
    lines += [f"| {f['name']} | {f['bytes_per_element']:.2f} | {f['ns_per_element']:.3f} | "
              f"{f['most_it_can_stream_gbps']:.1f} GB/s |" for f in floor]
    if iteration is not None:
        lines += [""] + iteration_markdown(iteration)
    return "\n".join(lines) + "\n"


def plot(layouts_run: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(layouts_run), figsize=(6 * len(layouts_run), 4.5), squeeze=False)
    for ax, layout in zip(axes[0], layouts_run):
        rows = [r for r in layout["rows"] if "skipped" not in r]
        ax.barh([r["name"] for r in rows], [r["median_ms"] for r in rows],
                color=["tab:blue" if r["name"].startswith("FusedAdamW") else "tab:gray" for r in rows])
        ax.set_xscale("log")
        ax.set_xlabel("ms per step (median, log scale)")
        ax.set_title(layout["layout"])
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1e6 elements and few rounds (seconds)")
    parser.add_argument("--iterations", type=int, default=None, help="measured rounds (default 15; --quick 3)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--floor-elements", type=int, default=262_144)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args(argv)
    args.iterations = args.iterations or (3 if args.quick else 15)
    info = machine_info("cpu")
    layouts_run = [run_layout(name, shapes, args) for name, shapes in layouts(args.quick)]
    floor = compute_floor(args.floor_elements, 2 if args.quick else 5)
    iteration = run_iteration(args)
    text = markdown(info, layouts_run, floor, iteration)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "layouts": layouts_run, "compute_floor": floor, "iteration": iteration}
    (args.out / "eight_bit_step.json").write_text(json.dumps(payload, indent=2, default=str))
    (args.out / "eight_bit_step.md").write_text(text)
    if plot(layouts_run, args.out / "eight_bit_step.png"):
        print(f"chart: {args.out / 'eight_bit_step.png'}", file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()

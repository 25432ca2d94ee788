"""Times one optimizer step of noam_ext.FusedAdamW (with the in-op Noam schedule)
against torch.optim.AdamW with foreach=False, foreach=True and fused=True (each
followed by TransformerLRScheduler.step(), which the torch loop needs), and
DeepSpeed's CPU Adam when it is installed, side by side in one run.

Layouts: one flat parameter of N elements; transformer-shaped stacks (the weight
matrices, biases and LayerNorms of torch.nn.Transformer layers); many tiny
tensors, which expose fixed per-step costs.

Reports medians (and the interquartile range) after warm-up, each peer's time over
ours, effective bandwidth at 28 bytes per float32 parameter (read p, g, m, v;
write p, m, v), and that bandwidth as a fraction of a memory ceiling measured in
the same run: an in-place read-modify-write pass over as many bytes (on a CPU a
plain copy undercounts because of write-allocate traffic), and on a GPU a device
copy. Prints a markdown table, writes JSON and, with matplotlib, a PNG chart.

    python benchmarks/bench_step.py            # full run on the CPU (about 5-10 minutes)
    python benchmarks/bench_step.py --quick    # seconds; CI's smoke test
    python benchmarks/bench_step.py --device cuda
"""

from __future__ import annotations

import argparse
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

import torch

import noam_ext

BYTES_PER_PARAM = 28  # float32, no amsgrad: 4 reads + 3 writes of 4 bytes
D_MODEL, WARMUP = 512, 4000


# ---- layouts ------------------------------------------------------------------------------

def transformer_shapes(d_model: int, layers: int) -> list[tuple[int, ...]]:
    """Parameter shapes of `layers` torch.nn.TransformerEncoderLayer(d_model, ff=4*d_model)."""
    d, ff = d_model, 4 * d_model
    per_layer = [(3 * d, d), (3 * d,), (d, d), (d,), (ff, d), (ff,), (d, ff), (d,), (d,), (d,), (d,), (d,)]
    return per_layer * layers


def layouts(quick: bool, device: str, memory_bytes: int) -> list[tuple[str, str, list[tuple[int, ...]]]]:
    """(kind, name, shapes) of every case to run."""
    cases = []
    flat_sizes = [10**5, 10**6] if quick else [10**5, 10**6, 10**7, 10**8]
    for n in flat_sizes:
        # Each optimizer holds params, grads and two moments: 16 bytes per element, two at a time.
        if 2 * 16 * n * 1.5 < memory_bytes:
            cases.append(("flat", f"flat {n:.0e}", [(n,)]))
    stacks = [(128, 5)] if quick else [(128, 5), (256, 13), (512, 32)]   # ~1e6, ~1e7, ~1e8
    for d, layers in stacks:
        shapes = transformer_shapes(d, layers)
        n = sum(torch.Size(s).numel() for s in shapes)
        if 2 * 16 * n * 1.5 < memory_bytes:
            cases.append(("transformer", f"transformer {n / 1e6:.1f}M ({len(shapes)} tensors)", shapes))
    for count in ([200] if quick else [20, 200]):
        cases.append(("small", f"{count} tensors x 5", [(5,)] * count))
    return cases


# ---- optimizers under test ----------------------------------------------------------------

def make_params(shapes, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator).to(device)) for s in shapes]
    return params


def give_grads(params, optimizer=None):
    """Gradients as the training loop leaves them: for FusedAdamW in its flat
    buffer (zero_grad + accumulation), for torch as ordinary tensors."""
    if isinstance(optimizer, noam_ext.FusedAdamW):
        for p in params:
            p.grad = torch.empty_like(p)
        optimizer.zero_grad(set_to_none=False)   # the gradients become views into the flat buffer
        with torch.no_grad():
            for p in params:
                p.grad.normal_()
    else:
        for p in params:
            p.grad = torch.randn_like(p)


def build_peers(shapes, device):
    """name -> zero-argument step function, each with its own parameters."""
    peers = {}
    params = make_params(shapes, device)
    ours = noam_ext.FusedAdamW(params, lr=1.0, betas=(0.9, 0.98), eps=1e-9,
                               schedule=noam_ext.Noam(D_MODEL, WARMUP))
    give_grads(params, ours)
    peers["noam_ext"] = ours.step
    for label, flags in (("torch for-loop", dict(foreach=False)), ("torch foreach", dict(foreach=True)),
                         ("torch fused", dict(fused=True))):
        params = make_params(shapes, device)
        opt = torch.optim.AdamW(params, lr=1.0, betas=(0.9, 0.98), eps=1e-9, **flags)
        sched = noam_ext.TransformerLRScheduler(opt, d_model=D_MODEL, warmup_steps=WARMUP)
        give_grads(params)

        def step(opt=opt, sched=sched):
            opt.step()
            sched.step()
        peers[label] = step
    if device == "cpu":
        try:  # optional peer, never required
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            params = make_params(shapes, device)
            ds = DeepSpeedCPUAdam(params, lr=1e-3, betas=(0.9, 0.98), eps=1e-9, adamw_mode=True)
            give_grads(params)
            peers["DeepSpeed CPU Adam"] = ds.step
        except Exception:  # noqa: BLE001  (not installed, or its extension cannot build here)
            pass
    return peers


# ---- timing -------------------------------------------------------------------------------

@dataclass
class Timing:
    median_s: float
    iqr_s: float
    runs: int


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
    q = statistics.quantiles(times, n=4)
    return Timing(statistics.median(times), q[2] - q[0], len(times))


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


# ---- the run ------------------------------------------------------------------------------

@dataclass
class CaseResult:
    kind: str
    name: str
    params: int
    tensors: int
    ceiling_gbps: float
    timings: dict = field(default_factory=dict)   # peer -> Timing

    def gbps(self, peer: str) -> float:
        return BYTES_PER_PARAM * self.params / self.timings[peer].median_s / 1e9


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


def run(args) -> tuple[dict, list[CaseResult]]:
    device = args.device
    timer = time_cpu if device == "cpu" else time_cuda
    if device == "cpu":
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        memory = torch.cuda.get_device_properties(0).total_memory
    results = []
    cases = layouts(args.quick, device, memory)
    for index, (kind, name, shapes) in enumerate(cases, 1):
        n = sum(torch.Size(s).numel() for s in shapes)
        print(f"[{index}/{len(cases)}] {name}: {n:,} parameters", file=sys.stderr, flush=True)
        result = CaseResult(kind, name, n, len(shapes), ceiling_gbps(n, device, timer, args.min_run_time))
        for peer, fn in build_peers(shapes, device).items():
            result.timings[peer] = timer(fn, args.min_run_time)
            print(f"    {peer:<20} {result.timings[peer].median_s * 1e6:12.1f} us", file=sys.stderr, flush=True)
        results.append(result)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return machine_info(device), results


def markdown(info: dict, results: list[CaseResult]) -> str:
    peers = [p for p in results[0].timings if p != "noam_ext"]
    where = info.get("cpu") or info.get("gpu")
    lines = [
        f"Machine: {where}, {info['device']}, {info['threads']} threads, torch {info['torch']}, "
        f"noam_ext CPU capability {info['noam_ext']['cpu_capability']}, {info['date']}",
        "",
        "| layout | params | tensors | noam_ext | GB/s | % of ceiling | "
        + " | ".join(f"{p} (x slower)" for p in peers) + " |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(peers),
    ]
    for r in results:
        ours = r.timings["noam_ext"]
        cells = [f"{r.timings[p].median_s * 1e6:,.0f} us ({r.timings[p].median_s / ours.median_s:.2f}x)"
                 for p in peers]
        lines.append(
            f"| {r.name} | {r.params:,} | {r.tensors} | {ours.median_s * 1e6:,.1f} us "
            f"(IQR {ours.iqr_s * 1e6:,.1f}) | {r.gbps('noam_ext'):.1f} | "
            f"{100 * r.gbps('noam_ext') / r.ceiling_gbps:.0f}% of {r.ceiling_gbps:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "Times are medians of one step (plus TransformerLRScheduler.step() for torch); "
              "GB/s counts 28 bytes per float32 parameter; the ceiling is "
              + ("an in-place read-modify-write pass" if info["device"] == "cpu" else "a device copy")
              + " over as many bytes, measured in the same run."]
    return "\n".join(lines)


def plot(results: list[CaseResult], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind, marker in (("flat", "o"), ("transformer", "s")):
        rows = [r for r in results if r.kind == kind]
        if not rows:
            continue
        xs = [r.params for r in rows]
        left.plot(xs, [r.gbps("noam_ext") for r in rows], marker=marker, label=f"noam_ext, {kind}")
        left.plot(xs, [r.ceiling_gbps for r in rows], marker=marker, linestyle=":", color="grey",
                  label=f"ceiling, {kind}")
        for peer in rows[0].timings:
            if peer != "noam_ext":
                right.plot(xs, [r.timings[peer].median_s / r.timings["noam_ext"].median_s for r in rows],
                           marker=marker, label=f"{peer}, {kind}")
    left.set(xscale="log", xlabel="parameters", ylabel="GB/s (28 B per parameter)",
             title="noam_ext step bandwidth")
    right.set(xscale="log", yscale="log", xlabel="parameters", ylabel="peer time / noam_ext time",
              title="how much slower each peer is")
    right.axhline(1.0, color="black", linewidth=0.8)
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="a seconds-long subset (CI smoke test)")
    parser.add_argument("--min-run-time", type=float, default=None, help="seconds per measurement")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args(argv)
    if args.min_run_time is None:
        args.min_run_time = 0.05 if args.quick else 1.0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available")
    info, results = run(args)
    table = markdown(info, results)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_{args.device}{'_quick' if args.quick else ''}"
    payload = {"machine": info, "results": [
        {**{k: v for k, v in asdict(r).items() if k != "timings"},
         "timings": {p: asdict(t) for p, t in r.timings.items()},
         "noam_ext_gbps": r.gbps("noam_ext")} for r in results]}
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    (args.out / f"{stem}.md").write_text(table + "\n")
    if plot(results, args.out / f"{stem}.png"):
        print(f"\nchart: {args.out / f'{stem}.png'}", file=sys.stderr)
    print(f"results: {args.out / f'{stem}.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""The report: the machine description, the markdown tables of every section, and the
JSON payload."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from dataclasses import asdict
from pathlib import Path

import torch

import noam_ext

from .config import CLIP_BYTES_OURS, CLIP_BYTES_TORCH, CLIP_LABEL, FUSED, NO_STEP, OURS, TORCH_PEERS, clip_bytes
from .distributed import WORLD_SIZE, DistResult
from .iteration import IterationResult
from .low_bytes import CEILING_TARGET, FUSED_BF16, FUSED_F32, PEERS, TARGET_MIN_ELEMENTS, LowBytesResult
from .step import CaseResult

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


def iteration_header(first: IterationResult) -> list[str]:
    peers = [label for label, _ in TORCH_PEERS]
    return [
        f"### Whole training iteration (zero_grad + forward + backward + step), median of {first.iterations} "
        f"after {first.warmup} warm-up, interleaved round-robin",
        "",
        "| model | params | tensors | batch | zero_grad | noam_ext | "
        + " | ".join(f"{p} (x slower)" for p in peers) + f" | ours vs torch fused | {NO_STEP} |",
        "|---|---:|---:|---|---|---:|" + "---:|" * len(peers) + "---:|---:|",
    ]


def iteration_row(r: IterationResult) -> str:
    peers = [label for label, _ in TORCH_PEERS]
    ours = r.timings[OURS]
    cells = [f"{ms(r.timings[p].median_s)} ({r.ratio(p):.2f}x)" for p in peers]
    zero_grad = f"`{r.zero_grad}`" + (f", **{CLIP_LABEL}** ({r.clip_state()})" if r.clipped else "")
    return (f"| {r.model} | {r.params:,} | {r.tensors} | {r.batch} | {zero_grad} | "
            f"{ms(ours.median_s)} (IQR {ours.iqr_s * 1e3:,.2f}) | " + " | ".join(cells)
            + f" | **{r.ratio(FUSED):.2f}x** | {ms(r.timings[NO_STEP].median_s)} |")


def iteration_markdown(results: list[IterationResult]) -> str:
    lines = iteration_header(results[0]) + [iteration_row(r) for r in results]
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


def clip_header(first: CaseResult) -> list[str]:
    peers = [p for p, _ in TORCH_PEERS]
    return [
        f"### Clip + step (gradient clipping to max_norm {first.clip_max_norm}, then one optimizer step)",
        "",
        f"| layout | params | tensors | noam_ext clip + step | GB/s ({CLIP_BYTES_OURS} B) | % of ceiling | "
        + " | ".join(f"{p} (x slower)" for p in peers)
        + f" | {FUSED} GB/s ({CLIP_BYTES_TORCH} B) | clip + step over step alone: ours / {FUSED} |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(peers) + "---:|---:|",
    ]


def clip_row(r: CaseResult) -> str:
    peers = [p for p, _ in TORCH_PEERS]
    ours = r.clip_timings[OURS]
    cells = [f"{r.clip_timings[p].median_s * 1e6:,.0f} us ({r.clip_ratio(p):.2f}x)" for p in peers]
    return (f"| {r.name} | {r.params:,} | {r.tensors} | {ours.median_s * 1e6:,.1f} us (IQR {ours.iqr_s * 1e6:,.1f}) | "
            f"{r.clip_gbps(OURS):.1f} | {100 * r.clip_gbps(OURS) / r.ceiling_gbps:.0f}% of {r.ceiling_gbps:.1f} | "
            + " | ".join(cells)
            + f" | {r.clip_gbps(FUSED):.1f} | {r.clip_over_step(OURS):.2f}x / {r.clip_over_step(FUSED):.2f}x |")


def clip_markdown(info: dict, results: list[CaseResult]) -> str:
    rows = [r for r in results if r.clip_timings]
    lines = clip_header(rows[0]) + [clip_row(r) for r in rows]
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


def step_peers(first: CaseResult) -> list[str]:
    """The peers of the step table's columns (those of its first row)."""
    return [p for p in first.timings if p != OURS]


def step_header(first: CaseResult) -> list[str]:
    peers = step_peers(first)
    return [
        "### One optimizer step",
        "",
        "| layout | params | tensors | noam_ext | GB/s | % of ceiling | "
        + " | ".join(f"{p} (x slower)" for p in peers) + " |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(peers),
    ]


def step_row(r: CaseResult, peers: list[str]) -> str:
    ours = r.timings[OURS]
    cells = [f"{r.timings[p].median_s * 1e6:,.0f} us ({r.timings[p].median_s / ours.median_s:.2f}x)"
             for p in peers]
    return (f"| {r.name} | {r.params:,} | {r.tensors} | {ours.median_s * 1e6:,.1f} us "
            f"(IQR {ours.iqr_s * 1e6:,.1f}) | {r.gbps(OURS):.1f} | "
            f"{100 * r.gbps(OURS) / r.ceiling_gbps:.0f}% of {r.ceiling_gbps:.1f} | " + " | ".join(cells) + " |")


def step_markdown(info: dict, results: list[CaseResult]) -> str:
    peers = step_peers(results[0])
    lines = step_header(results[0]) + [step_row(r, peers) for r in results]
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


def low_bytes_header(first: LowBytesResult) -> list[str]:
    return [
        f"### Fewer bytes per parameter: one step per storage variant, median of {first.iterations} after "
        f"{first.warmup} warm-up, interleaved round-robin with {' and '.join(PEERS)} and the ceilings",
        "",
        "| layout | variant | bytes/element | median | GB/s | % of ceiling (its bytes) | "
        f"{FUSED_F32} / this | {FUSED_BF16} / this | targets |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def low_bytes_targets(r: LowBytesResult, name: str) -> str:
    """The targets cell: each target with its value, met or not, or why none apply."""
    targets = r.targets(name)
    if not targets:
        return ""
    why_not = r.targets_apply()
    if why_not is not None:
        return f"n/a ({why_not})"
    cells = []
    for t in targets:
        shown = "-" if t["value"] is None else (f"{100 * t['value']:.0f}%" if t["threshold"] == CEILING_TARGET
                                                else f"{t['value']:.2f}x")
        cells.append(f"{'met' if t['met'] else '**NOT met**'}: {t['target']} ({shown})")
    return "; ".join(cells)


def low_bytes_rows(r: LowBytesResult) -> list[str]:
    """One row per variant of one layout (skipped ones say why), or one row saying why the
    layout did not run."""
    if r.layout_skipped is not None:
        return [f"| {r.name} | every variant | | skipped: {r.layout_skipped} | | | | | |"]
    rows = []
    for v in r.variants:
        if v.name not in r.timings:
            rows.append(f"| {r.name} | {v.name} | {v.bytes_per_element} | skipped: "
                        f"{r.skipped.get(v.name, 'not run').replace('|', '/')} | | | | | |")
            continue
        t = r.timings[v.name]
        ceiling = r.ceiling_gbps(v.bytes_per_element)
        rows.append(f"| {r.name} | {v.name} | {v.bytes_per_element} | {ms(t.median_s)} (IQR {t.iqr_s * 1e3:,.2f}) | "
                    f"{r.gbps(v.name):.1f} | {100 * r.fraction_of_ceiling(v.name):.0f}% of {ceiling:.1f} | "
                    f"{_ratio(r.ratio(FUSED_F32, v.name))} | {_ratio(r.ratio(FUSED_BF16, v.name))} | "
                    f"{low_bytes_targets(r, v.name)} |")
    return rows


def low_bytes_markdown(info: dict, results: list[LowBytesResult]) -> str:
    lines = low_bytes_header(results[0]) + [row for r in results for row in low_bytes_rows(r)]
    ceiling = ("an in-place read-modify-write pass (`buf.mul_(1.0)`)" if info["device"] == "cpu"
               else "a device copy")
    lines += ["", "Each variant steps its own parameters with FusedAdamW (lr 1.0 x Noam(512, 4000), betas (0.9, 0.98), "
              "eps 1e-9, weight decay 0.01; torch: torch.optim.AdamW(fused=True) + TransformerLRScheduler.step()), "
              "the gradients assigned once and left in place, bfloat16 for bfloat16 parameters (and in the 'bf16 "
              "grads' variant), float32 otherwise. Bytes per element: what one step reads and writes (parameter "
              "read and written, only written when a float32 master holds its value; gradient read; both moments "
              "and the master, float32 or int16 remainder, read and written; 8-bit moments: their codes, and "
              "their scales' 16/256 B more count in GB/s). GB/s: those bytes x elements / "
              f"median time. The ceiling for each byte count is {ceiling} over as many bytes, timed in the same "
              "rounds. Ratios: the peer's median over the variant's (> 1: the variant is faster)."]
    measured = [r for r in results if r.layout_skipped is None]
    checked = [(r, v.name, t) for r in measured if r.targets_apply() is None
               for v in r.measured() for t in r.targets(v.name)]
    if checked:
        missed = [f"{r.name}, {name}: {t['target']}" for r, name, t in checked if not t["met"]]
        lines += ["", f"Targets of the issue (CPU, from {TARGET_MIN_ELEMENTS:.0e} elements): "
                  f"{len(checked) - len(missed)} of {len(checked)} met"
                  + (". Not met: " + "; ".join(missed) + "." if missed else ".")]
    elif measured:
        lines += ["", f"The issue's targets hold on the CPU from {TARGET_MIN_ELEMENTS:.0e} elements: none apply to "
                  "these rows (" + ", ".join(sorted({r.targets_apply() for r in measured})) + ")."]
    return "\n".join(lines)


def low_bytes_payload(results: list[LowBytesResult]) -> list[dict]:
    out = []
    for r in results:
        variants = {}
        for v in r.variants:
            row = {"bytes_per_element": v.bytes_per_element, "scale_bytes_per_element": v.scale_bytes_per_element,
                   "param": str(v.param), "grad": str(v.grad),
                   "moment": str(v.moment_dtype), "master": v.master, "stochastic_rounding": v.stochastic,
                   "torch_peer": v.torch_peer, "skipped": r.skipped.get(v.name)}
            if v.name in r.timings:
                row.update(timing=asdict(r.timings[v.name]), times_s=r.times_s[v.name], gbps=r.gbps(v.name),
                           ceiling_gbps=r.ceiling_gbps(v.bytes_per_element),
                           fraction_of_ceiling=r.fraction_of_ceiling(v.name),
                           over_torch_fused_float32=r.ratio(FUSED_F32, v.name),
                           over_torch_fused_bfloat16=r.ratio(FUSED_BF16, v.name),
                           paired_over_torch_fused_float32=r.paired_ratio(FUSED_F32, v.name),
                           paired_over_torch_fused_bfloat16=r.paired_ratio(FUSED_BF16, v.name),
                           targets=r.targets(v.name))
            variants[v.name] = row
        ceilings = {int(label.split()[1]): {"timing": asdict(t), "gbps": r.ceiling_gbps(int(label.split()[1]))}
                    for label, t in r.timings.items() if label.startswith("ceiling ")}
        out.append({"kind": r.kind, "name": r.name, "params": r.params, "tensors": r.tensors, "device": r.device,
                    "warmup": r.warmup, "iterations": r.iterations, "layout_skipped": r.layout_skipped,
                    "targets_apply": r.targets_apply() is None, "variants": variants, "ceilings": ceilings})
    return out


def distributed_header(first: DistResult) -> list[str]:
    peers = [label for label, _ in TORCH_PEERS]
    return [
        f"### One optimizer step on DTensor parameters: FSDP2 and tensor parallel, {WORLD_SIZE} processes on gloo "
        f"(CPU), median of the slower rank over {first.iterations} steps after {first.warmup} warm-up, "
        "interleaved round-robin",
        "",
        "| configuration | params | DTensor params | placements | noam_ext | "
        + " | ".join(f"{p} (x slower)" for p in peers) + " | ours vs torch fused | largest param gap |",
        "|---|---:|---:|---|---:|" + "---:|" * len(peers) + "---:|---:|",
    ]


def distributed_row(r: DistResult) -> str:
    peers = [label for label, _ in TORCH_PEERS]
    ours = r.timings[OURS]
    placements = ", ".join(f"{name} x {count}" for name, count in sorted(r.placements.items()))
    cells = [f"{r.timings[p].median_s * 1e3:,.3f} ms ({r.ratio(p):.2f}x)" for p in peers]
    return (f"| {r.label} | {r.params:,} | {r.dtensors} | {placements} | {ours.median_s * 1e3:,.3f} ms "
            f"(IQR {ours.iqr_s * 1e3:,.3f}) | " + " | ".join(cells)
            + f" | **{r.ratio(FUSED):.2f}x** | {max(r.param_gap.values()):.2g} |")


def distributed_markdown(results: list[DistResult], failure: str | None) -> str:
    lines = distributed_header(results[0]) + [distributed_row(r) for r in results] if results else [
        "### One optimizer step on DTensor parameters: FSDP2 and tensor parallel"]
    if failure is not None:
        lines += ["", f"**Incomplete:** {failure.splitlines()[0]} (the whole message is on stderr and in the JSON)."]
    if results:
        lines += ["", "Each optimizer steps its own copy of the model, placed as the row says: FSDP2 `fully_shard` "
                  "per layer and the root (Shard(0)), or tensor parallel (ColwiseParallel: weight and bias Shard(0); "
                  "RowwiseParallel: weight Shard(1), bias Replicate; attention in_proj Shard(0), LayerNorms "
                  "Replicate). Every optimizer gets the same gradients, placed like their parameters and assigned "
                  "once (`p.grad = DTensor`, left in place); both ranks enter each timed step together (a barrier "
                  "before it). Each cell: the median of the slower rank (a step waits for its slowest rank), in "
                  "brackets that median over ours (> 1: ours is faster). Ours: FusedAdamW with the Noam schedule "
                  "in the op; torch: torch.optim.AdamW + TransformerLRScheduler.step(). Largest param gap: the "
                  "largest over the optimizers of ||p - p_for_loop|| / ||p_for_loop - p_0|| after all steps (~0: "
                  f"every optimizer made torch's update; 1: one left the parameters as they were). "
                  f"{results[0].threads} torch thread(s) per rank."]
    return "\n".join(lines)


def markdown(info: dict, iterations: list[IterationResult], steps: list[CaseResult],
             clip_skipped: str | None = None, distributed: list[DistResult] | None = None,
             distributed_failure: str | None = None, distributed_skipped: str | None = None,
             low_bytes: list[LowBytesResult] | None = None) -> str:
    parts = [machine_line(info)]
    if clip_skipped is not None:
        parts.append(f"**Gradient-clipping rows skipped:** {clip_skipped}.")
    if distributed_skipped is not None:
        parts.append(f"**Distributed section skipped:** {distributed_skipped}.")
    if iterations:
        parts.append(iteration_markdown(iterations))
    if steps:
        parts.append(step_markdown(info, steps))
    if any(r.clip_timings for r in steps):
        parts.append(clip_markdown(info, steps))
    if low_bytes:
        parts.append(low_bytes_markdown(info, low_bytes))
    if distributed or distributed_failure is not None:
        parts.append(distributed_markdown(distributed or [], distributed_failure))
    return "\n\n".join(parts)


def payload(info: dict, iterations: list[IterationResult], steps: list[CaseResult],
            clip_skipped: str | None, distributed: list[DistResult] | None = None,
            distributed_failure: str | None = None, distributed_skipped: str | None = None,
            low_bytes: list[LowBytesResult] | None = None) -> dict:
    """Everything measured, for the JSON file."""
    return {
        "machine": info,
        "clip_skipped": clip_skipped,   # None when the clipping rows were measured
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
        "low_bytes": low_bytes_payload(low_bytes or []),
        "distributed_skipped": distributed_skipped,   # None when the section ran (or was not asked for)
        "distributed_failure": distributed_failure,   # None when every configuration was measured
        "distributed": [
            {**{k: v for k, v in asdict(r).items() if k not in ("timings", "rank_timings", "times_s")},
             "label": r.label,
             "timings": {p: asdict(t) for p, t in r.timings.items()},
             "rank_timings": {p: [asdict(t) for t in ts] for p, ts in r.rank_timings.items()},
             "ratios_over_ours": {p: r.ratio(p) for p, _ in TORCH_PEERS},
             "ours_vs_torch_fused": r.ratio(FUSED),
             "times_s": r.times_s} for r in distributed or []],
    }

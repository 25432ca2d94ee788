"""The PNG charts of every section (matplotlib, when installed; each plot function says
whether it wrote its chart)."""

from __future__ import annotations

import statistics
from pathlib import Path

from .config import FUSED, NO_STEP, OURS, TORCH_PEERS
from .distributed import DistResult
from .iteration import IterationResult
from .low_bytes import FUSED_F32, LowBytesResult
from .step import CaseResult

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


def plot_distributed(results: list[DistResult], path: Path) -> bool:
    """Time per step of each optimizer (the slower rank's median, whiskers its quartiles),
    log scale, one group of bars per configuration; torch fused's ratio over ours on top."""
    plt = _pyplot()
    if plt is None or not results:
        return False
    from matplotlib.ticker import FuncFormatter
    names = [OURS] + [label for label, _ in TORCH_PEERS]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.7 * len(results) + 2), 5.0))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(results))]
        medians, below, above = [], [], []
        for r in results:
            ts = r.times_s[name][r.slower_rank[name]]
            q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
            med = r.timings[name].median_s
            medians.append(med * 1e3)
            below.append(max(0.0, med - q[0]) * 1e3)
            above.append(max(0.0, q[2] - med) * 1e3)
        bars = ax.bar(xs, medians, width, yerr=[below, above], capsize=2, label=name, color=f"C{j}",
                      edgecolor="black" if name == FUSED else None, linewidth=1.2 if name == FUSED else 0)
        if name == FUSED:   # above the whisker
            for bar, r, top in zip(bars, results, (m + a for m, a in zip(medians, above))):
                ax.annotate(f"{r.ratio(FUSED):.1f}x", (bar.get_x() + bar.get_width() / 2, top),
                            xytext=(0, 2), textcoords="offset points",
                            ha="center", va="bottom", fontsize=7, fontweight="bold")
    # "TransformerEncoder 6 x (d=256, ...)" is wider than its bar group: its bracket on a line of its own
    labels = [f"{r.label.replace(', ', chr(10), 1).replace(' (', chr(10) + '(', 1)}\n{r.dtensors} DTensor params"
              for r in results]
    ax.set_xticks(range(len(results)), labels, fontsize=7)
    ax.set(yscale="log", ylabel="ms per step (slower rank's median; whiskers: quartiles)",
           title="optimizer step on DTensor parameters, 2 processes (gloo, CPU)\n"
                 "(bold: torch fused's time over noam_ext's)")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_low_bytes(results: list[LowBytesResult], path: Path) -> bool:
    """Left: GB/s of every variant per layout (bars), against the ceiling for its own byte
    count (black ticks). Right: torch fused float32's time over each variant's (bars), against
    the ratio its byte count alone would give, 28 B over its bytes (black ticks), and the
    issue's speed-up targets (red ticks)."""
    plt = _pyplot()
    rows = [r for r in results if r.measured()]
    if plt is None or not rows:
        return False
    names = [v.name for v in rows[0].variants]
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(12.0, 4.0 * len(rows) + 4), 5.5))
    width = 0.8 / len(names)
    fused_bytes = rows[0].variant(FUSED_F32).bytes_per_element
    target_labelled = False
    for j, name in enumerate(names):
        xs, gbps, ceilings, rx, ratios, ideal, targets = [], [], [], [], [], [], []
        for i, r in enumerate(rows):
            if name not in r.timings:
                continue
            v = r.variant(name)
            x = i + (j - (len(names) - 1) / 2) * width
            xs.append(x)
            gbps.append(r.gbps(name))
            ceilings.append(r.ceiling_gbps(v.bytes_per_element))
            ratio = r.ratio(FUSED_F32, name)
            if ratio is not None:
                rx.append(x)
                ratios.append(ratio)
                ideal.append(fused_bytes / v.bytes_per_element)
                targets.append(v.speedup_target)
        label = f"{name} ({rows[0].variant(name).bytes_per_element} B)"
        left.bar(xs, gbps, width, label=label, color=f"C{j % 10}", hatch="//" if j >= 10 else None)
        left.scatter(xs, ceilings, marker="_", s=120, color="black", zorder=3,
                     label="ceiling at its bytes" if j == 0 else None)
        right.bar(rx, ratios, width, color=f"C{j % 10}", hatch="//" if j >= 10 else None)
        right.scatter(rx, ideal, marker="_", s=120, color="black", zorder=3,
                      label=f"{fused_bytes} B / its bytes" if j == 0 else None)
        marked = [(x, t) for x, t in zip(rx, targets) if t is not None]
        if marked:
            right.scatter([x for x, _ in marked], [t for _, t in marked], marker="_", s=120, color="red", zorder=4,
                          label=None if target_labelled else "target (CPU, from 1e7 elements)")
            target_labelled = True
    labels = [r.name.replace(" (", "\n(") for r in rows]
    left.set_xticks(range(len(rows)), labels, fontsize=7)
    left.set(ylabel="GB/s (its bytes per element x elements / median)",
             title="one step per storage variant: bandwidth against the ceiling")
    right.axhline(1.0, color="black", linewidth=0.8)
    right.set_xticks(range(len(rows)), labels, fontsize=7)
    right.set(ylabel=f"{FUSED_F32} median / variant median (> 1: faster)",
              title=f"speed-up over {FUSED_F32}")
    right.legend(fontsize=7)
    fig.legend(*left.get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=7)   # below both panels
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True

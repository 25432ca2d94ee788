"""Prints every schedule FusedAdamW can compute in the op at a few steps, and plots
them all on one figure (python examples/schedule_demo.py)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from noam_ext.schedules import (DECAY_SHAPES, Noam, WarmupConstant, WarmupCosine, WarmupInverseSqrt, WarmupLinear,
                                WarmupStableDecay, noam_peak_lr)


def demo_schedules(steps: int, warmup: int, d_model: int, min_lr_ratio: float) -> dict[str, dict]:
    """Name -> {schedule, scale, panel}: scale makes each peak 1 (Noam's factor peaks at
    noam_peak_lr, the others at 1); panel 0 holds the schedules that decay until the end,
    panel 1 warmup-stable-decay with each decay shape (the last 20% of the steps)."""
    decay = steps // 5
    out = {
        "constant": dict(schedule=WarmupConstant(warmup), panel=0),
        "linear": dict(schedule=WarmupLinear(warmup, steps, min_lr_ratio), panel=0),
        "cosine": dict(schedule=WarmupCosine(warmup, steps, min_lr_ratio), panel=0),
        "inverse sqrt": dict(schedule=WarmupInverseSqrt(warmup), panel=0),
        "Noam": dict(schedule=Noam(d_model, warmup), scale=1.0 / noam_peak_lr(d_model, warmup), panel=0),
    }
    for shape in DECAY_SHAPES:
        out[f"WSD {shape}"] = dict(schedule=WarmupStableDecay(warmup, steps - warmup - decay, decay, shape, min_lr_ratio),
                                   panel=1)
    for entry in out.values():
        entry.setdefault("scale", 1.0)
    return out


def plot_schedules(schedules: dict[str, dict], steps: int, path: Path) -> bool:
    """Writes a PNG of every schedule on one figure; returns False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    xs = list(range(1, steps + steps // 10 + 1))   # a tenth past the end: the floors
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    titles = ("Warmup, then decay until the last step", "Warmup-stable-decay (WSD), by decay shape")
    for panel, (ax, title) in enumerate(zip(axes, titles)):
        for name, entry in schedules.items():
            if entry["panel"] != panel:
                continue
            # The k-th step() runs with factor(k - 1).
            ys = [entry["scale"] * entry["schedule"].factor(k - 1) for k in xs]
            label = name + (" (scaled to peak 1)" if entry["scale"] != 1.0 else "")
            ax.plot(xs, ys, label=label, linestyle="--" if name == "Noam" else "-")
        ax.axvline(steps, color="grey", linestyle=":", linewidth=1)
        ax.set(title=title, xlabel="optimizer step", ylim=(0, 1.05))
        ax.legend(fontsize=8)
    axes[0].set_ylabel("lr / base lr")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10_000, help="length of the run (total steps)")
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--d-model", type=int, default=512, help="Noam's d_model")
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="the floor of the decaying schedules")
    parser.add_argument("--plot", type=Path,
                        default=Path(os.environ.get("NOAM_EXT_DEMO_OUT", "demo_out")) / "schedules.png")
    args = parser.parse_args(argv)
    schedules = demo_schedules(args.steps, args.warmup, args.d_model, args.min_lr_ratio)
    shown = sorted({1, args.warmup // 2, args.warmup, args.warmup + 1, args.steps // 2, 4 * args.steps // 5,
                    args.steps, args.steps + 100})
    width = max(len(name) for name in schedules) + 2
    print(f"lr / base lr at the k-th step() ({args.steps} steps, warmup {args.warmup}, "
          f"floor {args.min_lr_ratio}); every peak is 1 (Noam's, {noam_peak_lr(args.d_model, args.warmup):.3e} "
          f"for d_model={args.d_model}, is scaled to it):")
    print(" " * width + "".join(f"{k:>10}" for k in shown))
    for name, entry in schedules.items():
        values = [entry["scale"] * entry["schedule"].factor(k - 1) for k in shown]
        print(f"{name:<{width}}" + "".join(f"{v:>10.4f}" for v in values))
    if plot_schedules(schedules, args.steps, args.plot):
        print(f"plot written to {args.plot}")
    else:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()

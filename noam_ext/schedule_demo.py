"""Prints the Noam schedule at a few steps and plots it (python -m noam_ext.schedule_demo)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .scheduler import noam_lr, noam_peak_lr


def plot_schedule(d_model: int, warmup: int, steps: int, path: Path) -> bool:
    """Writes a PNG of the schedule; returns False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    xs = list(range(1, steps + 1))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, [noam_lr(s, d_model, warmup) for s in xs])
    ax.axvline(warmup, color="grey", linestyle=":", label=f"warmup = {warmup}")
    ax.set(xlabel="optimizer step", ylabel="learning rate",
           title=f"Noam schedule, d_model={d_model}")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=4000)
    parser.add_argument("--plot", type=Path, default=Path(os.environ.get("NOAM_EXT_DEMO_OUT", "demo_out")) / "noam_schedule.png")
    args = parser.parse_args(argv)
    d, w = args.d_model, args.warmup
    print(f"Noam schedule, d_model={d}, warmup={w}: lr = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)")
    for step in (1, 100, 1000, w // 2, w, 2 * w, 10 * w, 100 * w):
        print(f"  step {step:>8}: lr = {noam_lr(step, d, w):.6e}")
    print(f"  peak at step {w}: {noam_peak_lr(d, w):.6e}")
    if plot_schedule(d, w, 10 * w, args.plot):
        print(f"plot written to {args.plot}")
    else:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()

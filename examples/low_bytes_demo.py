"""Trains the demo's sequence-reversal Transformer with bfloat16 parameters under each of
FusedAdamW's low-byte options, against float32 torch.optim.AdamW
(python examples/low_bytes_demo.py).

Why: a bfloat16 parameter updated in float32 and rounded to nearest once per step (what
torch's fused=True does) loses every update smaller than half a bfloat16 ulp, about 2**-9 of
the weight. With a small learning rate most updates are that small and training stalls.
Master weights (float32, or int16 remainders that rebuild the float32 master exactly) and
stochastic rounding keep those updates (exactly, or on average).

The variants, all from the same initial weights (the bfloat16 ones from the float32 weights
rounded to nearest) and fed the same batches, with the same learning-rate schedule:

  float32 torch AdamW           the reference: float32 model, torch.optim.AdamW(foreach=False)
  bf16 torch fused              bfloat16 model, torch.optim.AdamW(fused=True): round to nearest
  bf16 round-to-nearest         bfloat16 model, FusedAdamW with no option
  bf16 stochastic rounding      FusedAdamW(stochastic_rounding=True)
  bf16 + float32 master         FusedAdamW(master_weights="float32")
  bf16 + remainder              FusedAdamW(master_weights="remainder")
  bf16 + remainder, bf16 moments  FusedAdamW(master_weights="remainder", moment_dtype=torch.bfloat16)

The bfloat16 models run forward and backward in bfloat16 (their gradients are bfloat16); the
logits are converted to float32 for the loss only, so that the recorded losses are not
rounded to 8 bits. Hyperparameters other than the learning rate are the demo's (betas (0.9,
0.98), eps 1e-9, weight decay 0.01 on matrices, label smoothing 0.1, gradients clipped to
norm 1).

Outputs in --out: low_bytes_training.png (every loss curve on one figure),
low_bytes_training.json (per variant: final loss, held-out accuracy, the step where it stops
improving, the loss curve) and low_bytes_training.md (the table, with the machine and date).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import importlib.util
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

import torch
from torch import nn

from noam_ext import FusedAdamW, ScheduleLR, WarmupConstant, WarmupCosine, param_groups
from noam_ext.schedules import Schedule
from train_demo import (BETAS, EPS, EVAL_BATCH, LABEL_SMOOTHING, MAX_GRAD_NORM, WEIGHT_DECAY, Seq2SeqTransformer,
                         accuracy, add_task_arguments, check_task_arguments, loss_floor, make_batch,
                         progress_bar)

FINAL_MEAN_STEPS = 50        # the final loss is the mean over this many last steps (one batch is noisy)
SMOOTHING_WINDOW = 51        # centred moving mean for the figure and for where a curve stops improving
IMPROVEMENT_NATS = 0.01      # less than this much further drop counts as no longer improving
REFRESH_EVERY = 25           # progress-bar refreshes


@dataclass(frozen=True)
class Variant:
    """One way of storing and updating the parameters."""

    key: str                 # short name, used in the JSON
    label: str               # what the figure and the table call it
    dtype: torch.dtype       # the model's (and so the gradients') dtype
    bytes_per_element: int   # read + written per element and step (docs/adamw.md, "Fewer bytes per parameter")
    fused_options: dict | None   # FusedAdamW options; None: a torch.optim.AdamW (or a peer's)
    torch_fused: bool = False    # for a torch.optim.AdamW: fused=True (else the for-loop)
    peer: str | None = None      # another library's 8-bit AdamW: "torchao" or "bitsandbytes" (optional)


VARIANTS = (
    Variant("fp32_torch", "float32, torch AdamW (reference)", torch.float32, 28, None),
    Variant("bf16_torch_fused", "bf16, torch AdamW fused (round to nearest)", torch.bfloat16, 14, None,
            torch_fused=True),
    Variant("bf16_nearest", "bf16, FusedAdamW round to nearest", torch.bfloat16, 14, {}),
    Variant("bf16_stochastic", "bf16, FusedAdamW stochastic rounding", torch.bfloat16, 14,
            {"stochastic_rounding": True}),
    Variant("bf16_master", "bf16 + float32 master", torch.bfloat16, 28, {"master_weights": "float32"}),
    Variant("bf16_remainder", "bf16 + int16 remainder", torch.bfloat16, 26, {"master_weights": "remainder"}),
    Variant("bf16_remainder_bf16_moments", "bf16 + int16 remainder, bf16 moments", torch.bfloat16, 18,
            {"master_weights": "remainder", "moment_dtype": torch.bfloat16}),
    # 8-bit moments (codes with a float32 scale per 256 elements: + 0.06 bytes per element)
    Variant("fp32_8bit", "float32, FusedAdamW 8-bit moments", torch.float32, 16, {"moment_dtype": "8bit"}),
    Variant("bf16_stochastic_8bit", "bf16, stochastic rounding, 8-bit moments", torch.bfloat16, 10,
            {"stochastic_rounding": True, "moment_dtype": "8bit"}),
    Variant("fp32_torchao_8bit", "float32, torchao AdamW8bit (reference)", torch.float32, 16, None, peer="torchao"),
    Variant("fp32_bnb_8bit", "float32, bitsandbytes AdamW8bit (reference)", torch.float32, 16, None,
            peer="bitsandbytes"),
)
VARIANT_KEYS = tuple(v.key for v in VARIANTS)


@dataclass
class RunResult:
    variant: Variant
    losses: list[float]
    lrs: list[float]
    initial_digest: str      # of the initial weights rounded to bfloat16 (equal for every variant)
    sequence_accuracy: float
    token_accuracy: float
    seconds: float


# ---- setup --------------------------------------------------------------------------------------

def unavailable(variant: Variant) -> str | None:
    """Why a variant cannot run here (a peer library that is not installed), or None."""
    if variant.peer is not None and importlib.util.find_spec(variant.peer) is None:
        return f"{variant.peer} is not installed (pip install {variant.peer})"
    return None


def peer_optimizer(variant: Variant, groups, args):
    if variant.peer == "torchao":
        from torchao.optim import AdamW8bit
    else:
        from bitsandbytes.optim import AdamW8bit
    return AdamW8bit(groups, lr=args.lr, betas=BETAS, eps=EPS)


def make_schedule(args) -> Schedule:
    if args.schedule == "cosine":
        return WarmupCosine(args.warmup, args.steps, args.min_lr_ratio)
    return WarmupConstant(args.warmup)


def initial_state(args) -> dict[str, torch.Tensor]:
    """The float32 initial weights every variant starts from (the demo's initialization)."""
    torch.manual_seed(args.seed)
    model = Seq2SeqTransformer(args.vocab, args.d_model, args.heads, args.layers, args.seq_len)
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def make_model(args, state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The model in `dtype` on `device`, its weights `state` rounded to `dtype` (to nearest even).

    On the device before any optimizer is built: FusedAdamW moves the parameters into flat
    buffers, which a later .to() would detach them from."""
    model = Seq2SeqTransformer(args.vocab, args.d_model, args.heads, args.layers, args.seq_len)
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype)


def weights_digest(model: nn.Module) -> str:
    """sha256 of every parameter rounded to bfloat16: equal when two models start from the
    same weights, one of them rounded to bfloat16."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        digest.update(name.encode())
        digest.update(p.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def make_optimizer(variant: Variant, model: nn.Module, args, schedule: Schedule):
    """(optimizer, torch LR scheduler or None); FusedAdamW computes the schedule in the op."""
    groups = param_groups(model, weight_decay=WEIGHT_DECAY)
    if variant.peer is not None:
        optimizer = peer_optimizer(variant, groups, args)
        return optimizer, ScheduleLR(optimizer, schedule)
    if variant.fused_options is None:
        optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=BETAS, eps=EPS, fused=variant.torch_fused or None,
                                      foreach=False)
        return optimizer, ScheduleLR(optimizer, schedule)
    options = dict(variant.fused_options)
    if options.get("stochastic_rounding"):
        options["seed"] = args.seed
    return FusedAdamW(groups, lr=args.lr, betas=BETAS, eps=EPS, schedule=schedule, **options), None


# ---- training -----------------------------------------------------------------------------------

def loss_on_batch(model: nn.Module, src: torch.Tensor, tgt_in: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The demo's loss, from float32 logits: a bfloat16 loss would itself be rounded to 8 bits."""
    logits = model(src, tgt_in).float()
    return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                       label_smoothing=LABEL_SMOOTHING)


def train_variant(variant: Variant, args, state, schedule: Schedule, device: torch.device, bar,
                  eval_batch) -> RunResult:
    started = time.perf_counter()
    model = make_model(args, state, variant.dtype, device)
    digest = weights_digest(model)
    optimizer, scheduler = make_optimizer(variant, model, args, schedule)
    generator = torch.Generator().manual_seed(args.seed + 1)   # the same batches for every variant
    losses, lrs = [], []
    for step in range(1, args.steps + 1):
        batch = make_batch(args.batch_size, args.seq_len, args.vocab, generator, device)
        lrs.append(float(optimizer.param_groups[0]["lr"]))   # the lr this step uses (torchao keeps a tensor)
        optimizer.zero_grad()
        loss = loss_on_batch(model, *batch)
        loss.backward()
        if scheduler is None:
            optimizer.clip_grad_norm_(MAX_GRAD_NORM)   # fused into the step
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.detach())
        bar.update(1)
        if step % REFRESH_EVERY == 0 or step == args.steps:
            bar.set_postfix_str(f"{variant.key} loss {loss.item():.3f} lr {lrs[-1]:.1e}")
    src, _, target = eval_batch
    sequence_acc, token_acc = accuracy(model, src, target)
    return RunResult(variant, torch.stack(losses).tolist(), lrs, digest, sequence_acc, token_acc,
                     time.perf_counter() - started)


# ---- summaries ----------------------------------------------------------------------------------

def smoothed(losses: list[float], window: int = SMOOTHING_WINDOW) -> list[float]:
    """Centred moving mean over `window` steps (fewer at the ends): unlike a trailing mean it
    does not shift the curve to later steps."""
    half = window // 2
    prefix = [0.0]
    for x in losses:
        prefix.append(prefix[-1] + x)
    out = []
    for i in range(len(losses)):
        lo, hi = max(0, i - half), min(len(losses), i + half + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def stops_improving(losses: list[float], window: int = SMOOTHING_WINDOW, tolerance: float = IMPROVEMENT_NATS) -> int:
    """The first step (1-based) after which the smoothed loss never falls more than
    `tolerance` below its value there: where the curve stops improving. A curve still
    improving at the end gives a step near the end."""
    curve = smoothed(losses, window)
    lowest_after = float("inf")
    answer = len(curve)
    for i in range(len(curve) - 1, -1, -1):   # walk back, keeping the lowest value seen after i
        if lowest_after < curve[i] - tolerance:
            break
        answer = i + 1
        lowest_after = min(lowest_after, curve[i])
    return answer


def summary(result: RunResult) -> dict:
    tail = min(FINAL_MEAN_STEPS, len(result.losses))
    return {
        "label": result.variant.label,
        "dtype": str(result.variant.dtype).removeprefix("torch."),
        "optimizer": (f"{result.variant.peer}.optim.AdamW8bit" if result.variant.peer is not None else
                      "torch.optim.AdamW" + ("(fused=True)" if result.variant.torch_fused else "(foreach=False)")
                      if result.variant.fused_options is None else
                      "FusedAdamW(" + ", ".join(f"{k}={v!r}" for k, v in result.variant.fused_options.items()) + ")"),
        "bytes_per_element": result.variant.bytes_per_element,
        "final_loss": mean(result.losses[-tail:]),
        "last_loss": result.losses[-1],
        "min_smoothed_loss": min(smoothed(result.losses)),
        "stops_improving_at": stops_improving(result.losses),
        "sequence_accuracy": result.sequence_accuracy,
        "token_accuracy": result.token_accuracy,
        "initial_digest": result.initial_digest,
        "first_loss": result.losses[0],
        "seconds": result.seconds,
        "losses": result.losses,
        "lrs": result.lrs,
    }


def add_gaps_to_reference(payload: dict) -> None:
    """Per variant, the largest gap between its moving-mean loss and the float32
    reference's over the whole run: how closely it tracks float32, not just where it ends."""
    reference = payload["variants"].get("fp32_torch")
    if reference is None:
        return
    reference_curve = smoothed(reference["losses"])
    for entry in payload["variants"].values():
        entry["largest_gap_to_reference"] = max(abs(a - b) for a, b in zip(smoothed(entry["losses"]), reference_curve))


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"date": datetime.date.today().isoformat(), "platform": platform.platform(), "cpu": cpu,
            "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__}


def settings_line(args) -> str:
    schedule = (f"linear warmup over {args.warmup} steps, then cosine to {args.min_lr_ratio:g} x lr"
                if args.schedule == "cosine" else f"linear warmup over {args.warmup} steps, then constant")
    return (f"{args.steps} steps, batch {args.batch_size}, lr {args.lr:g} ({schedule}), betas {BETAS}, eps {EPS:g}, "
            f"weight decay {WEIGHT_DECAY} on matrices, gradients clipped to norm {MAX_GRAD_NORM}, "
            f"label smoothing {LABEL_SMOOTHING}; model d_model {args.d_model}, {args.heads} heads, "
            f"{args.layers}+{args.layers} layers; reversing {args.seq_len} tokens from a vocabulary of "
            f"{args.vocab - 1}; seed {args.seed}")


def markdown_table(payload: dict) -> str:
    m = payload["machine"]
    reference = payload["variants"].get("fp32_torch")
    lines = [
        "| variant | optimizer | bytes/element | final loss | vs float32 | largest gap to float32 "
        "| stops improving at step | exact sequences | tokens |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in payload["variants"].values():
        final_gap = f"{entry['final_loss'] - reference['final_loss']:+.5f}" if reference else "n/a"
        largest_gap = f"{entry['largest_gap_to_reference']:.4f}" if reference else "n/a"
        lines.append(f"| {entry['label']} | `{entry['optimizer']}` | {entry['bytes_per_element']} "
                     f"| {entry['final_loss']:.4f} | {final_gap} | {largest_gap} | {entry['stops_improving_at']} "
                     f"| {entry['sequence_accuracy']:.1%} | {entry['token_accuracy']:.1%} |")
    return "\n".join([
        f"Command: `{payload['command']}`",
        "",
        f"Settings: {payload['settings']}.",
        "",
        f"Machine: {m['cpu']} ({m['cores']} cores, {m['threads']} torch thread(s)), {m['platform']}, "
        f"torch {m['torch']}, {m['date']}. Losses and accuracies do not depend on the machine's load.",
        "",
        f"Final loss: mean of the last {payload['final_mean_steps']} steps' training losses (lowest possible "
        f"{payload['loss_floor']:.4f}, label smoothing {LABEL_SMOOTHING}). Stops improving: the first step after "
        f"which the {SMOOTHING_WINDOW}-step moving mean of the loss never falls more than {IMPROVEMENT_NATS} "
        f"below its value there ({payload['steps']}: still improving at the end). Largest gap: the largest "
        f"difference between the variant's and the float32 run's moving-mean losses over the whole run. "
        f"Accuracy: greedy decoding "
        f"of {payload['eval_batch']} held-out sequences (token chance level {1 / (payload['vocab'] - 1):.1%}).",
        "",
        *lines,
        "",
    ])


# Colour and line per variant. Curves that coincide (the two round-to-nearest runs; the
# master forms, bit for bit) get a dotted or dash-dotted line over a solid one, so both show.
STYLES = {
    "fp32_torch": dict(color="black", linestyle="--", linewidth=1.6, zorder=10),
    "bf16_torch_fused": dict(color="tab:orange", linestyle="-", linewidth=2.2),
    "bf16_nearest": dict(color="tab:red", linestyle=":", linewidth=2.0),
    "bf16_stochastic": dict(color="tab:green", linestyle="-", linewidth=1.4),
    "bf16_master": dict(color="tab:blue", linestyle="-", linewidth=2.2),
    "bf16_remainder": dict(color="tab:purple", linestyle=":", linewidth=2.0),
    "bf16_remainder_bf16_moments": dict(color="tab:brown", linestyle="-.", linewidth=1.4),
    "fp32_8bit": dict(color="tab:cyan", linestyle="-", linewidth=1.8),
    "bf16_stochastic_8bit": dict(color="tab:olive", linestyle="-", linewidth=1.4),
    "fp32_torchao_8bit": dict(color="tab:pink", linestyle=":", linewidth=1.6),
    "fp32_bnb_8bit": dict(color="tab:gray", linestyle="-.", linewidth=1.6),
}


def plot(payload: dict, path: Path) -> bool:
    """Every variant's loss (a moving mean, the raw losses faint behind) on one figure and,
    when the float32 reference ran, each one's difference from it beside (symmetric log
    scale: the round-to-nearest runs are a whole nat away, the others within hundredths);
    False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    floor = payload["loss_floor"]
    variants = payload["variants"]
    reference = variants.get("fp32_torch")
    fig, axes = plt.subplots(1, 2 if reference else 1, figsize=(15, 5.8) if reference else (8, 5.8), squeeze=False)
    loss_ax = axes[0][0]
    reference_curve = smoothed(reference["losses"]) if reference else None
    for key, entry in variants.items():
        steps = range(1, len(entry["losses"]) + 1)
        curve = smoothed(entry["losses"])
        style = dict(zorder=2)
        style.update(STYLES[key])
        loss_ax.plot(steps, entry["losses"], color=style["color"], alpha=0.08, linewidth=0.6, zorder=1)
        loss_ax.plot(steps, curve, label=f"{entry['label']}: {entry['final_loss']:.4f}", **style)
        if reference:
            axes[0][1].plot(steps, [c - r for c, r in zip(curve, reference_curve)], **style)
    loss_ax.axhline(floor, color="grey", linestyle=":", linewidth=1, label=f"lowest possible loss ({floor:.4f})")
    loss_ax.set(xlabel="optimizer step", ylabel=f"training loss ({SMOOTHING_WINDOW}-step moving mean)",
                title="Training loss (legend: final loss, mean of the last steps)")
    loss_ax.legend(fontsize=8)
    if reference:
        diff_ax = axes[0][1]
        diff_ax.set_yscale("symlog", linthresh=0.01)
        diff_ax.set(xlabel="optimizer step", ylabel="loss minus float32's (moving means; symmetric log scale)",
                    title="Difference from float32 torch AdamW")
    for ax in axes[0]:
        ax.grid(True, alpha=0.3, which="both")
    a = payload["args"]
    dtypes = sorted({entry["dtype"] for key, entry in variants.items() if key != "fp32_torch"})
    fig.suptitle(f"Sequence reversal with {' and '.join(dtypes)} parameters: {a['steps']} steps, lr {a['lr']:g} "
                 f"({a['schedule']}, warmup {a['warmup']}), batch {a['batch_size']}, seed {a['seed']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---- command line -------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=1200, help="optimizer steps per variant")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    parser.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                        help="after the linear warmup: constant, or a cosine down to --min-lr-ratio")
    parser.add_argument("--warmup", type=int, default=100, help="warmup steps")
    parser.add_argument("--min-lr-ratio", type=float, default=0.0, help="the cosine's floor, as a fraction of --lr")
    parser.add_argument("--variants", nargs="+", choices=VARIANT_KEYS, default=list(VARIANT_KEYS),
                        help="which variants to train")
    # Beside the demo's output (demo_out/ is ignored by git).
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("NOAM_EXT_DEMO_OUT", "demo_out")) / "low_bytes",
                        help="folder for the figure, JSON and table")
    add_task_arguments(parser)
    parser.add_argument("--eval-batch", type=int, default=EVAL_BATCH, help="held-out sequences for the accuracy")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: torch's default)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the figure")
    args = parser.parse_args(argv)
    if min(args.steps, args.warmup, args.d_model, args.batch_size, args.seq_len, args.eval_batch) <= 0:
        parser.error("--steps, --warmup, --d-model, --batch-size, --seq-len and --eval-batch must be positive")
    if args.schedule == "cosine" and args.warmup >= args.steps:
        parser.error(f"--warmup ({args.warmup}) must be below --steps ({args.steps}) for the cosine schedule")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if not 0.0 <= args.min_lr_ratio <= 1.0:
        parser.error(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    check_task_arguments(parser, args)
    if args.threads < 0:
        parser.error("--threads must be >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    variants = [v for v in VARIANTS if v.key in args.variants]
    for v in variants:
        if unavailable(v):
            print(f"{v.key}: skipped: {unavailable(v)}")
    variants = [v for v in variants if not unavailable(v)]
    print(f"{len(variants)} variants, {settings_line(args)}; on {device}")
    state = initial_state(args)
    schedule = make_schedule(args)
    # A generator of its own, so the held-out batch is none of the training batches.
    eval_batch = make_batch(args.eval_batch, args.seq_len, args.vocab, torch.Generator().manual_seed(args.seed + 2),
                            device)
    bar = progress_bar(args.steps * len(variants))
    results = [train_variant(v, args, state, schedule, device, bar, eval_batch) for v in variants]
    bar.close()
    payload = {
        "machine": machine_info(),
        "command": shlex.join(["python", "examples/low_bytes_demo.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": settings_line(args),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "steps": args.steps, "vocab": args.vocab, "eval_batch": args.eval_batch,
        "loss_floor": loss_floor(args.vocab), "final_mean_steps": min(FINAL_MEAN_STEPS, args.steps),
        "variants": {r.variant.key: summary(r) for r in results},
    }
    add_gaps_to_reference(payload)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "low_bytes_training.json").write_text(json.dumps(payload, indent=1))
    table = markdown_table(payload)
    (args.out / "low_bytes_training.md").write_text(table)
    print(table)
    if args.no_plot:
        print("figure skipped (--no-plot)")
    elif plot(payload, args.out / "low_bytes_training.png"):
        print(f"figure written to {args.out / 'low_bytes_training.png'}")
    else:
        print("matplotlib not installed: no figure")
    print(f"total time: {time.perf_counter() - started:.1f} s")
    return payload


if __name__ == "__main__":
    main()

"""Trains a small Transformer to reverse sequences with noam_ext and with torch, side by side
(python examples/train_demo.py).

The task: the source is a random sequence of tokens, the target is the same sequence reversed.
The decoder is trained with teacher forcing (its input is BOS followed by the target shifted right,
under a causal mask) and the paper's label smoothing of 0.1, and evaluated with greedy decoding on a
fresh held-out batch.

Two copies of the same model, starting from the same weights and fed the same batches, are trained:

  fused:  noam_ext.param_groups + noam_ext.FusedAdamW(schedule=noam_ext.Noam(...))
  torch:  noam_ext.param_groups + torch.optim.AdamW(foreach=False) + noam_ext.TransformerLRScheduler

with the paper's hyperparameters (lr=1.0 so the lr is the Noam factor itself, betas (0.9, 0.98),
eps 1e-9) and weight decay 0.01. FusedAdamW follows torch's AdamW term for term, so the learning
rates agree exactly and after the first step the parameters differ by rounding only (a few ulp at
most; docs/adamw.md). Training then amplifies that difference, as it would any 1-ulp change: the two
loss curves track each other closely but not exactly, and both models learn the task.

At the end the demo prints both final losses, the largest parameter difference between the two
models, both models' accuracy on the held-out batch and the total time, and writes a plot of the
losses and the lr to $NOAM_EXT_DEMO_OUT/train_demo.png (default demo_out/) when matplotlib is present.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

import torch
from torch import nn

from noam_ext import FusedAdamW, Noam, TransformerLRScheduler, build_info, noam_lr, noam_peak_lr, param_groups

# The paper's Adam settings; lr=1.0 makes each step's lr exactly the Noam factor.
BASE_LR = 1.0
BETAS = (0.9, 0.98)
EPS = 1e-9
WEIGHT_DECAY = 0.01
# The paper's label smoothing. Without it the loss heads for zero, Adam's second-moment estimates
# shrink with the gradients, and the rare larger gradient then causes a loss spike.
LABEL_SMOOTHING = 0.1

BOS = 0  # decoder start token; never appears in a source sequence
EVAL_BATCH = 1000  # held-out sequences for the accuracy check
REFRESH_EVERY = 10  # progress-bar refreshes: reading a loss is a device sync on CUDA
FINAL_MEAN_STEPS = 50


@dataclass
class RunHistory:
    """Per-step records of one training run."""

    losses: list[float]
    lrs: list[float]


# ---- the task -----------------------------------------------------------------------------------

def make_batch(batch_size: int, seq_len: int, vocab: int, generator: torch.Generator,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of the reversal task: (source, decoder input, decoder labels).

    Drawn on the CPU from `generator`, so a seed gives the same data on every device."""
    src = torch.randint(1, vocab, (batch_size, seq_len), generator=generator)
    target = src.flip(1)
    # Teacher forcing: the decoder sees BOS + target[:-1] and predicts target.
    bos = torch.full((batch_size, 1), BOS, dtype=src.dtype)
    tgt_in = torch.cat([bos, target[:, :-1]], dim=1)
    return src.to(device), tgt_in.to(device), target.to(device)


# ---- the model ----------------------------------------------------------------------------------

def sinusoidal_positions(max_len: int, d_model: int) -> torch.Tensor:
    """The paper's fixed sinusoidal position encodings, shape (max_len, d_model)."""
    position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(max_len, d_model)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: d_model // 2])
    return table


class Seq2SeqTransformer(nn.Module):
    """torch.nn.Transformer with token embeddings, sinusoidal positions and an output projection."""

    def __init__(self, vocab: int, d_model: int, nhead: int, layers: int, max_len: int):
        super().__init__()
        self.d_model = d_model
        self.src_embed = nn.Embedding(vocab, d_model)
        self.tgt_embed = nn.Embedding(vocab, d_model)
        # A buffer, not a parameter: the optimizers should see only trainable weights.
        self.register_buffer("positions", sinusoidal_positions(max_len, d_model), persistent=False)
        self.transformer = nn.Transformer(d_model=d_model, nhead=nhead, num_encoder_layers=layers,
                                          num_decoder_layers=layers, dim_feedforward=4 * d_model,
                                          dropout=0.0, batch_first=True)
        self.out = nn.Linear(d_model, vocab)
        for embedding in (self.src_embed, self.tgt_embed):
            # With torch's default N(0, 1) the sqrt(d_model) scaling below would make each input
            # component about 8 (for d_model 64); training was then much spikier and less reliable.
            # N(0, 1/d_model) (as in fairseq's Transformer) gives scaled components of about 1.
            nn.init.normal_(embedding.weight, std=d_model ** -0.5)

    def _embed(self, embedding: nn.Embedding, tokens: torch.Tensor) -> torch.Tensor:
        # Scaling by sqrt(d_model) (as in the paper) keeps tokens from being drowned by positions.
        return embedding(tokens) * math.sqrt(self.d_model) + self.positions[: tokens.size(1)]

    def encode(self, src: torch.Tensor) -> torch.Tensor:
        return self.transformer.encoder(self._embed(self.src_embed, src))

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Logits for every decoder position; the causal mask hides later positions."""
        mask = nn.Transformer.generate_square_subsequent_mask(tgt_in.size(1), device=tgt_in.device)
        hidden = self.transformer.decoder(self._embed(self.tgt_embed, tgt_in), memory,
                                          tgt_mask=mask, tgt_is_causal=True)
        return self.out(hidden)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.decode(tgt_in, self.encode(src))


def make_model_pair(args, vocab: int, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """Two models with identical initial weights, already on `device`.

    They must be on the device before the optimizers are built: FusedAdamW moves the
    parameters into flat buffers and a later .to() would detach them from those buffers."""
    torch.manual_seed(args.seed)
    first = Seq2SeqTransformer(vocab, args.d_model, args.heads, args.layers, args.seq_len).to(device)
    second = Seq2SeqTransformer(vocab, args.d_model, args.heads, args.layers, args.seq_len).to(device)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    return first, second


# ---- the optimizers -----------------------------------------------------------------------------

def make_fused_optimizer(model: nn.Module, args) -> FusedAdamW:
    """noam_ext's way: the Noam schedule is computed inside the fused AdamW op."""
    return FusedAdamW(param_groups(model, weight_decay=WEIGHT_DECAY), lr=BASE_LR, betas=BETAS, eps=EPS,
                      schedule=Noam(d_model=args.d_model, warmup_steps=args.warmup))


def make_torch_optimizer(model: nn.Module, args) -> tuple[torch.optim.AdamW, TransformerLRScheduler]:
    """The reference: torch's AdamW (single-tensor path) driven by a LambdaLR scheduler."""
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=WEIGHT_DECAY), lr=BASE_LR,
                                  betas=BETAS, eps=EPS, foreach=False)
    return optimizer, TransformerLRScheduler(optimizer, args.d_model, args.warmup)


# ---- training -----------------------------------------------------------------------------------

def loss_on_batch(model: nn.Module, src: torch.Tensor, tgt_in: torch.Tensor,
                  labels: torch.Tensor) -> torch.Tensor:
    logits = model(src, tgt_in)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                       label_smoothing=LABEL_SMOOTHING)


def loss_floor(vocab: int) -> float:
    """The lowest reachable loss: with label smoothing it is the entropy of the smoothed targets."""
    eps = LABEL_SMOOTHING
    p_true, p_other = 1.0 - eps + eps / vocab, eps / vocab
    return -p_true * math.log(p_true) - (vocab - 1) * p_other * math.log(p_other) if eps else 0.0


# Both runs clip gradients by global norm, as transformer recipes do.
MAX_GRAD_NORM = 1.0


def fused_step(model: nn.Module, optimizer: FusedAdamW, batch) -> tuple[torch.Tensor, float]:
    """One step of the fused run; returns (loss, lr used by this step)."""
    lr = optimizer.get_last_lr()[0]  # the lr the coming step() uses, known on the host (no sync)
    optimizer.zero_grad()
    loss = loss_on_batch(model, *batch)
    loss.backward()
    # Clipping by global norm, fused into the step: the norm now (no sync), the factor
    # applied as the step reads each gradient (no pass over the gradients of its own).
    optimizer.clip_grad_norm_(MAX_GRAD_NORM)
    optimizer.step()
    return loss.detach(), lr


def torch_step(model: nn.Module, optimizer: torch.optim.AdamW, scheduler: TransformerLRScheduler,
               batch) -> tuple[torch.Tensor, float]:
    """One step of the reference run; returns (loss, lr used by this step)."""
    lr = scheduler.get_last_lr()[0]
    optimizer.zero_grad()
    loss = loss_on_batch(model, *batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    optimizer.step()
    scheduler.step()
    return loss.detach(), lr


class TextProgress:
    """A minimal stand-in for tqdm: one line rewritten in place with a carriage return."""

    def __init__(self, total: int, width: int = 20):
        self.total, self.width, self.n, self.postfix = total, width, 0, ""

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text
        filled = self.width * self.n // max(self.total, 1)
        bar = "#" * filled + "-" * (self.width - filled)
        sys.stdout.write(f"\r[{bar}] {self.n}/{self.total} {self.postfix}")
        sys.stdout.flush()

    def close(self) -> None:
        self.set_postfix_str(self.postfix)
        sys.stdout.write("\n")


def progress_bar(total: int):
    """tqdm when installed, else TextProgress."""
    try:
        from tqdm import tqdm
    except ImportError:
        return TextProgress(total)
    # A fixed-width bar and a short postfix: the line fits 80 columns (about 75 characters).
    return tqdm(total=total, unit="step", bar_format="{percentage:3.0f}%|{bar:16}| {n_fmt}/{total_fmt} "
                                                     "[{elapsed}<{remaining}]{postfix}")


def train(args, vocab: int, device: torch.device, fused_model: nn.Module, torch_model: nn.Module):
    """Trains both models on the same batches.

    Returns both RunHistory records and the largest parameter difference after the first step,
    the one-step parity check (later differences also contain training's own amplification)."""
    fused_opt = make_fused_optimizer(fused_model, args)
    torch_opt, torch_sched = make_torch_optimizer(torch_model, args)
    generator = torch.Generator().manual_seed(args.seed + 1)
    fused_losses, torch_losses, fused_lrs, torch_lrs = [], [], [], []
    bar = progress_bar(args.steps)
    for step in range(1, args.steps + 1):
        batch = make_batch(args.batch_size, args.seq_len, vocab, generator, device)
        loss_a, lr_a = fused_step(fused_model, fused_opt, batch)
        loss_b, lr_b = torch_step(torch_model, torch_opt, torch_sched, batch)
        # Keep the losses as tensors; converting each one would sync a GPU every step.
        fused_losses.append(loss_a)
        torch_losses.append(loss_b)
        fused_lrs.append(lr_a)
        torch_lrs.append(lr_b)
        if step == 1:
            first_step_gap = max_param_difference(fused_model, torch_model)
        bar.update(1)
        if step % REFRESH_EVERY == 0 or step == args.steps:
            bar.set_postfix_str(f"loss {loss_a.item():.3f}/{loss_b.item():.3f} lr {lr_a:.2e}", refresh=True)
    bar.close()
    return (RunHistory(torch.stack(fused_losses).tolist(), fused_lrs),
            RunHistory(torch.stack(torch_losses).tolist(), torch_lrs), first_step_gap)


# ---- evaluation ---------------------------------------------------------------------------------

@torch.no_grad()
def greedy_decode(model: nn.Module, src: torch.Tensor) -> torch.Tensor:
    """Generates the target one token at a time, feeding back the model's own predictions."""
    memory = model.encode(src)
    tokens = torch.full((src.size(0), 1), BOS, dtype=src.dtype, device=src.device)
    for _ in range(src.size(1)):
        next_token = model.decode(tokens, memory)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    return tokens[:, 1:]


def accuracy(model: nn.Module, src: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(exact sequence accuracy, token accuracy) of greedy decoding."""
    model.eval()
    correct = greedy_decode(model, src) == target
    model.train()
    return correct.all(dim=1).float().mean().item(), correct.float().mean().item()


def max_param_difference(first: nn.Module, second: nn.Module) -> float:
    """The largest absolute elementwise difference between corresponding parameters."""
    return max((a - b).abs().max().item() for a, b in zip(first.parameters(), second.parameters()))


# ---- reporting ----------------------------------------------------------------------------------

def print_schedule(d_model: int, warmup: int, steps: int) -> None:
    """The Noam lr at a few steps of this run and its peak."""
    print(f"Noam schedule, d_model={d_model}, warmup={warmup}: "
          "lr = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)")
    marks = sorted({1, warmup // 2, warmup, 2 * warmup, steps} - {0})
    print("  " + "   ".join(f"step {s}: {noam_lr(s, d_model, warmup):.3e}" for s in marks))
    print(f"  peak at step {warmup}: {noam_peak_lr(d_model, warmup):.3e}")


def plot_training(fused: RunHistory, reference: RunHistory, args, floor: float, path: Path) -> bool:
    """Writes loss (both runs) and lr against step as two panels; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = range(1, len(fused.losses) + 1)
    fig, (loss_ax, lr_ax) = plt.subplots(2, 1, figsize=(8, 6), sharex=True,
                                         gridspec_kw={"height_ratios": [2, 1]})
    loss_ax.plot(steps, fused.losses, label="noam_ext.FusedAdamW + Noam", linewidth=1.5)
    # Dashed on top: where the runs agree, both lines stay visible.
    loss_ax.plot(steps, reference.losses, "--", label="torch.optim.AdamW + TransformerLRScheduler",
                 linewidth=1.2)
    loss_ax.axhline(floor, color="grey", linestyle=":",
                    label=f"lowest possible loss ({floor:.3f}, label smoothing {LABEL_SMOOTHING})")
    loss_ax.set(ylabel="training loss (cross-entropy)",
                title=f"Sequence reversal, d_model={args.d_model}, {args.layers}+{args.layers} layers, "
                      f"batch {args.batch_size}")
    loss_ax.legend()
    loss_ax.grid(True, alpha=0.3)
    lr_ax.plot(steps, fused.lrs, color="tab:green")
    lr_ax.axvline(args.warmup, color="grey", linestyle=":", label=f"warmup = {args.warmup}")
    lr_ax.set(xlabel="optimizer step", ylabel="learning rate")
    lr_ax.legend()
    lr_ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def print_agreement(fused: RunHistory, reference: RunHistory, fused_model: nn.Module,
                    torch_model: nn.Module, first_step_gap: float, floor: float) -> None:
    """Prints final losses, lr agreement and parameter differences of the two runs."""
    # One batch's loss is noisy; the mean over the last steps is the fairer comparison.
    tail = min(FINAL_MEAN_STEPS, len(fused.losses))
    print(f"final loss   fused: {fused.losses[-1]:.6f}   torch: {reference.losses[-1]:.6f}   "
          f"(lowest possible {floor:.6f})")
    print(f"  mean of the last {tail} steps: fused {mean(fused.losses[-tail:]):.6f}, "
          f"torch {mean(reference.losses[-tail:]):.6f}")
    lr_gap = max(abs(a - b) for a, b in zip(fused.lrs, reference.lrs))
    print(f"largest |lr difference| over all steps: {lr_gap:.3e}")
    # FusedAdamW's parameters may differ from torch's by an ulp or so per step (torch's sqrt is
    # not correctly rounded, docs/adamw.md). Training is chaotic: Adam with eps 1e-9 turns the pure
    # rounding-noise gradients of e.g. attention key biases into full-size steps, and the
    # difference grows from there, as it does between two torch runs 1 ulp apart. So the parity
    # check is the first step's gap; the end is compared by loss and accuracy, not by weights.
    print(f"parity after one step: the weights differ by up to {first_step_gap:.1e} (rounding)")
    print(f"after {len(fused.losses)} steps the weights differ by up to "
          f"{max_param_difference(fused_model, torch_model):.1e}: expected, as training amplifies any\n"
          "  1-ulp difference (two torch runs do the same); compare the losses and accuracies instead")


def print_accuracy(fused_model: nn.Module, torch_model: nn.Module, args, vocab: int,
                   device: torch.device) -> None:
    """Prints both models' greedy-decoding accuracy on a fresh held-out batch."""
    # A generator of its own, so the held-out batch is not one of the training batches.
    src, _, target = make_batch(EVAL_BATCH, args.seq_len, vocab,
                                torch.Generator().manual_seed(args.seed + 2), device)
    chance = 1.0 / (vocab - 1)
    print(f"held-out accuracy, greedy decoding on {EVAL_BATCH} fresh sequences "
          f"(token chance level {chance:.1%}):")
    for name, model in (("fused", fused_model), ("torch", torch_model)):
        sequence_acc, token_acc = accuracy(model, src, target)
        print(f"  {name}: exact sequences {sequence_acc:.1%}   tokens {token_acc:.1%}")


# ---- command line -------------------------------------------------------------------------------

def default_device() -> str:
    # The fused op has a CUDA implementation only in CUDA builds of noam_ext.
    if torch.cuda.is_available() and build_info()["cuda_compiled"]:
        return "cuda"
    return "cpu"


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and task flags this demo shares with low_bytes_demo."""
    parser.add_argument("--d-model", type=int, default=64, help="model width")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--layers", type=int, default=2, help="encoder and decoder layers (each)")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per batch")
    parser.add_argument("--seq-len", type=int, default=8, help="tokens per sequence")
    parser.add_argument("--vocab", type=int, default=11, help="vocabulary size, BOS included")


def check_task_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.d_model % args.heads:
        parser.error(f"--d-model ({args.d_model}) must be a multiple of --heads ({args.heads})")
    if args.vocab < 3:
        parser.error("--vocab must be at least 3 (BOS and two data tokens)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=1200, help="optimizer steps")
    parser.add_argument("--warmup", type=int, default=200, help="Noam warm-up steps")
    add_task_arguments(parser)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default_device())
    parser.add_argument("--seed", type=int, default=0)
    # One thread: this model's matrices are too small to gain from more, and OpenMP threads
    # slow down many times over when other work shares the cores.
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: torch's default)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the plot")
    parser.add_argument("--plot", type=Path,
                        default=Path(os.environ.get("NOAM_EXT_DEMO_OUT", "demo_out")) / "train_demo.png",
                        help="where the plot goes")
    args = parser.parse_args(argv)
    if min(args.steps, args.warmup, args.d_model, args.batch_size, args.seq_len) <= 0:
        parser.error("--steps, --warmup, --d-model, --batch-size and --seq-len must be positive")
    check_task_arguments(parser, args)
    if args.threads < 0:
        parser.error("--threads must be >= 0")
    if args.device == "cuda" and not (torch.cuda.is_available() and build_info()["cuda_compiled"]):
        parser.error("--device cuda needs a CUDA GPU and a noam_ext build with CUDA")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print_schedule(args.d_model, args.warmup, args.steps)
    print(f"task: reverse {args.seq_len} tokens from a vocabulary of {args.vocab - 1} (+ BOS); "
          f"{args.steps} steps of batch {args.batch_size} on {device}")
    fused_model, torch_model = make_model_pair(args, args.vocab, device)
    fused, reference, first_step_gap = train(args, args.vocab, device, fused_model, torch_model)
    floor = loss_floor(args.vocab)
    print_agreement(fused, reference, fused_model, torch_model, first_step_gap, floor)
    print_accuracy(fused_model, torch_model, args, args.vocab, device)
    if args.no_plot:
        print("plot skipped (--no-plot)")
    elif plot_training(fused, reference, args, floor, args.plot):
        print(f"plot written to {args.plot}")
    else:
        print("matplotlib not installed: no plot")
    print(f"total time: {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()

"""FusedAdamW with 8-bit moments under FSDP2, on the CPU: gloo processes on this machine.

Each process trains its shard of a small MLP with moment_dtype="8bit" and prints what the
optimizer keeps per parameter: 8-bit codes and scales placed as the parameter, or float
moments, with the warning, for a shard that would cut a 256-element block. Then the two
checkpoint paths (docs/eight_bit_state.md, "Blocks and shards"):
  - a sharded checkpoint (torch.distributed.checkpoint.save), loaded into a fresh FSDP2 model
    and optimizer: it continues bit for bit as the run that saved it;
  - a full state dict (get_optimizer_state_dict(full_state_dict=True)), loaded into one process:
    every parameter is 8-bit there, so the moments the shards kept in float are quantized on
    load (one rounding) and the run continues close to the sharded one, not bit for bit.

    .venv/bin/python examples/fsdp2_eight_bit.py --steps 20
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WIDTH = 256   # one block: FSDP2's row shards of every weight below hold whole blocks


def make_model(hidden: int) -> torch.nn.Module:
    torch.manual_seed(0)
    # The LayerNorm's 256 elements are one block: split over 2 ranks it would be cut, so it
    # keeps float32 moments (and FusedAdamW says so).
    return torch.nn.Sequential(torch.nn.Linear(WIDTH, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, WIDTH),
                               torch.nn.LayerNorm(WIDTH))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(32, WIDTH, generator=g)
    return x, torch.tanh(x.roll(1, dims=1))


def state_bytes(state: dict) -> int:
    """Bytes of a parameter's optimizer state on this rank (local shards of DTensors)."""
    local = [getattr(t, "_local_tensor", t) for k, t in state.items() if k != "step"]
    return sum(t.numel() * t.element_size() for t in local)


def worker(rank: int, world: int, folder: str, steps: int, hidden: int) -> None:
    import noam_ext
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    say = print if rank == 0 else (lambda *a, **k: None)
    mesh = init_device_mesh("cpu", (world,))
    model, opt = sharded_run(hidden, mesh)

    def train(model, opt, first, count, log=False):
        for step in range(first, first + count):
            x, y = batch(step)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            if log and (step % 5 == 0 or step == first + count - 1):
                say(f"  step {step:3d}  loss {loss.item():.5f}")

    say(f"{world} processes, FSDP2 on the CPU, FusedAdamW(moment_dtype='8bit'):")
    with warnings.catch_warnings(record=True) as caught:   # the state, and its warnings, come at the first step
        warnings.simplefilter("always")
        train(model, opt, 0, steps, log=True)
    for message in {str(w.message) for w in caught}:
        say(f"  warning: {message}")
    say("state on rank 0 (bytes per local element):")
    for name, p in model.named_parameters():
        state, shard = opt.state[p], p.to_local()
        form = "8-bit codes + scales" if "exp_avg_codes" in state else f"{state['exp_avg'].dtype} moments"
        say(f"  {name:10s} {tuple(p.shape)!s:12s} placed {p.placements}: {form}, "
            f"{state_bytes(state) / max(shard.numel(), 1):.2f} B/elt")

    # The warning said above comes again for each new optimizer's first step.
    warnings.filterwarnings("ignore", message="FusedAdamW: moment_dtype='8bit' keeps")
    # A sharded checkpoint (every rank writes its shards), loaded into a fresh FSDP2 run.
    checkpoint = Path(folder) / "checkpoint"
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(checkpoint))
    full_params = {name: p.full_tensor() for name, p in model.named_parameters()}
    resumed, resumed_opt = sharded_run(hidden, mesh, full_params)
    template = {"optim": get_optimizer_state_dict(resumed, resumed_opt)}
    dcp.load(template, checkpoint_id=str(checkpoint))
    set_optimizer_state_dict(resumed, resumed_opt, template["optim"])
    # A full state dict (gathered on every rank), loaded into one process.
    full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    single = make_model(hidden)
    single.load_state_dict(full_params)
    single_opt = noam_ext.FusedAdamW(single.parameters(), lr=1e-3, moment_dtype="8bit")
    set_optimizer_state_dict(single, single_opt, full, options=StateDictOptions(full_state_dict=True))
    for run, run_opt in ((model, opt), (resumed, resumed_opt), (single, single_opt)):
        train(run, run_opt, steps, 3)
    same = all(torch.equal(p.full_tensor(), q.full_tensor()) for p, q in zip(model.parameters(), resumed.parameters()))
    gap = max(((p.full_tensor() - q).abs().max() / q.abs().max()).item()
              for p, q in zip(model.parameters(), single.parameters()))
    say("3 more steps after the checkpoints:")
    say(f"  from the sharded checkpoint, FSDP2: {'bit for bit the run that saved it' if same else 'DIFFERENT'}")
    say(f"  from the full state dict, one process: largest difference {gap:.2e} of a parameter's largest value")
    dist.destroy_process_group()
    if not same:
        raise SystemExit(1)


def sharded_run(hidden: int, mesh, params=None):
    """make_model() under FSDP2 (each Linear and LayerNorm, then the root) and its optimizer."""
    import noam_ext
    from torch.distributed.fsdp import fully_shard
    model = make_model(hidden)
    if params is not None:
        model.load_state_dict(params)
    for module in model:
        if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, noam_ext.FusedAdamW(model.parameters(), lr=1e-3, moment_dtype="8bit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps before the checkpoint (default 20)")
    parser.add_argument("--world-size", type=int, default=2, help="gloo processes (default 2)")
    parser.add_argument("--hidden", type=int, default=512,
                        help="hidden width; a multiple of 256 keeps every weight 8-bit (default 512)")
    args = parser.parse_args()
    if not dist.is_available() or not dist.is_gloo_available():
        raise SystemExit("this torch has no torch.distributed with gloo")
    with tempfile.TemporaryDirectory(prefix="noam_ext_fsdp2_") as folder:
        mp.spawn(worker, args=(args.world_size, folder, args.steps, args.hidden), nprocs=args.world_size)


if __name__ == "__main__":
    main()

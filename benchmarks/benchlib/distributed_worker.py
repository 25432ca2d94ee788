"""One rank of the distributed section (benchlib/distributed.py starts each rank as a fresh
Python running this module, as tests/distributed/test_distributed.py does, rendezvous through a
FileStore). For every configuration it builds one model per optimizer from the same seed,
places its parameters as DTensors (FSDP2 or tensor parallel), assigns the same gradients
once, times step() of all optimizers interleaved round-robin (the ranks enter every timed
step together, after a barrier), checks that every optimizer moved the parameters as torch
for-loop did, and writes its times to result-<config>-rank<rank>.json.

    python -m benchlib.distributed_worker --rank R --world-size 2 --dir DIR --warmup W --iterations N
    (DIR holds configs.json, written by the parent)
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import time
import traceback
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

import noam_ext

from .config import D_MODEL, OURS, TORCH_PEERS, WARMUP, adamw_kwargs
from .iteration import encoder
from .timer import time_interleaved

COLLECTIVE_TIMEOUT_S = 120   # gloo: a rank left waiting in a collective fails after this


def linears(count: int, width: int) -> torch.nn.Module:
    """`count` x Linear(width, width), nothing between them: only the parameters matter here
    (no forward pass is run)."""
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(count)])


def build_model(config: dict) -> torch.nn.Module:
    torch.manual_seed(0)   # every optimizer's copy starts from the same weights
    if config["model"] == "linears":
        return linears(config["count"], config["width"])
    return encoder(config["d_model"], config["heads"], config["ff"], config["layers"])


def _dtensor_api():
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor   # torch >= 2.5
    except ImportError:
        from torch.distributed._tensor import DTensor, Replicate, Shard, distribute_tensor
    return DTensor, Replicate, Shard, distribute_tensor


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard          # torch >= 2.6
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard  # torch 2.4, 2.5
    return fully_shard


def place_fsdp2(model: torch.nn.Module, mesh) -> None:
    """fully_shard per layer (each Linear, or each encoder layer), then the root: every
    parameter becomes a DTensor sharded Shard(0)."""
    fully_shard = _fully_shard()
    layers = model.layers if hasattr(model, "layers") else list(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def place_tensor_parallel(model: torch.nn.Module, mesh) -> None:
    """Megatron-style tensor parallelism through torch.distributed.tensor.parallel: in a
    Linear stack, even layers ColwiseParallel (weight and bias Shard(0)) and odd layers
    RowwiseParallel (weight Shard(1), bias Replicate); in an encoder layer linear1
    colwise, linear2 and the attention's out_proj rowwise. The parameters no parallel
    style covers are distributed directly: the attention's stacked in_proj weight and bias
    Shard(0) (split across heads), the LayerNorms Replicate."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    _, Replicate, Shard, distribute_tensor = _dtensor_api()
    if hasattr(model, "layers"):
        plan = {}
        for i in range(len(model.layers)):
            plan[f"layers.{i}.linear1"] = ColwiseParallel()
            plan[f"layers.{i}.linear2"] = RowwiseParallel()
            plan[f"layers.{i}.self_attn.out_proj"] = RowwiseParallel()
    else:
        plan = {str(i): ColwiseParallel() if i % 2 == 0 else RowwiseParallel() for i in range(len(model))}
    parallelize_module(model, mesh, plan)
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if not _is_dtensor(p):
                placement = Shard(0) if name.startswith("in_proj") else Replicate()
                module.register_parameter(name, torch.nn.Parameter(_distribute(p.data, mesh, placement)))


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor")


_NO_COMMUNICATION = "src_data_rank" in inspect.signature(_dtensor_api()[3]).parameters


def _distribute(full: torch.Tensor, mesh, *placements) -> torch.Tensor:
    """A DTensor of `full` (the same on every rank): each rank keeps its own shard of its
    own copy, without a collective where this torch allows it (src_data_rank=None)."""
    distribute_tensor = _dtensor_api()[3]
    if _NO_COMMUNICATION:
        return distribute_tensor(full, mesh, list(placements), src_data_rank=None)
    return distribute_tensor(full, mesh, list(placements))


def placement_name(placement) -> str:
    if placement.is_shard():
        return f"Shard({placement.dim})"
    if placement.is_replicate():
        return "Replicate"
    return str(placement)


def give_grads(params: list[torch.Tensor], mesh) -> None:
    """The same gradients for every optimizer, placed like their parameters, assigned once
    (`p.grad = tensor`) and left in place, as the step section does."""
    for index, p in enumerate(params):
        full = torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 + index))
        p.grad = _distribute(full, mesh, *p.placements) if _is_dtensor(p) else full


class Candidate:
    """One optimizer on its own copy of the placed model; `run()` is the timed step."""

    def __init__(self, name: str, config: dict, mesh):
        self.name = name
        self.model = build_model(config)
        (place_fsdp2 if config["parallel"] == "fsdp2" else place_tensor_parallel)(self.model, mesh)
        self.params = list(self.model.parameters())
        give_grads(self.params, mesh)
        self.scheduler = None
        if name == OURS:
            self.optimizer = noam_ext.FusedAdamW(self.params, **adamw_kwargs(),
                                                 schedule=noam_ext.Noam(D_MODEL, WARMUP))
        else:
            self.optimizer = torch.optim.AdamW(self.params, **adamw_kwargs(), **dict(TORCH_PEERS)[name])
            self.scheduler = noam_ext.TransformerLRScheduler(self.optimizer, d_model=D_MODEL, warmup_steps=WARMUP)

    def run(self) -> None:
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def local(self) -> list[torch.Tensor]:
        """This rank's values of the parameters, each element counted on one rank only
        (a replicated parameter on rank 0), as float64 copies."""
        return [_local(p).detach().double().clone() if not _replicated(p) or dist.get_rank() == 0
                else torch.zeros(0, dtype=torch.float64) for p in self.params]


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if _is_dtensor(p) else p


def _replicated(p: torch.Tensor) -> bool:
    return not _is_dtensor(p) or all(pl.is_replicate() for pl in p.placements)


def parameter_gaps(initial: list[torch.Tensor], candidates: list[Candidate]) -> tuple[dict, float]:
    """||p - p_for_loop|| / ||p_for_loop - p_0|| over all ranks, per optimizer: each made the
    same steps with the same gradients from the same weights, so a working optimizer ends
    near 0 (rounding) and one that skipped its update near 1. Also how far torch for-loop
    moved the parameters, ||p_for_loop - p_0|| / ||p_0||, which must not be 0."""
    reference = next(c for c in candidates if c.name == "torch for-loop").local()
    sums = [sum(float((r - p0).pow(2).sum()) for r, p0 in zip(reference, initial)),
            sum(float(p0.pow(2).sum()) for p0 in initial)]
    for c in candidates:
        sums.append(sum(float((p - r).pow(2).sum()) for p, r in zip(c.local(), reference)))
    total = torch.tensor(sums, dtype=torch.float64)
    dist.all_reduce(total)
    moved = float(total[0]) ** 0.5
    gaps = {c.name: float(total[i + 2]) ** 0.5 / max(moved, 1e-30) for i, c in enumerate(candidates)}
    return gaps, moved / max(float(total[1]) ** 0.5, 1e-30)


def measure(config: dict, mesh, warmup: int, iterations: int) -> dict:
    started = time.perf_counter()
    names = [OURS] + [label for label, _ in TORCH_PEERS]
    candidates = [Candidate(name, config, mesh) for name in names]
    first = candidates[0]
    initial = first.local()
    times = time_interleaved(candidates, Candidate.run, warmup, iterations, before=lambda c: dist.barrier())
    params = first.params
    gaps, moved = parameter_gaps(initial, candidates)
    return {
        "index": config["index"],
        "parallel": config["parallel"],
        "name": config["name"],
        "params": sum(p.numel() for p in params),
        "tensors": len(params),
        "dtensors": sum(_is_dtensor(p) for p in params),
        "placements": dict(Counter(",".join(placement_name(pl) for pl in p.placements)
                                   for p in params if _is_dtensor(p))),
        "local_params": sum(_local(p).numel() for p in params),
        "threads": torch.get_num_threads(),
        "times_s": times,
        "param_gap": gaps,
        "reference_moved": moved,
        "seconds": time.perf_counter() - started,
    }


def write_json(path: Path, data: dict) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data))
    partial.rename(path)   # the parent, polling, never reads half a file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--iterations", type=int, required=True)
    args = parser.parse_args()
    # The ranks share the machine's cores.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world_size))
    dist.init_process_group("gloo", init_method=f"file://{args.dir / 'store'}", rank=args.rank,
                            world_size=args.world_size, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (args.world_size,))
        for config in json.loads((args.dir / "configs.json").read_text()):
            path = args.dir / f"result-{config['index']}-rank{args.rank}.json"
            try:
                result = measure(config, mesh, args.warmup, args.iterations)
            except Exception:
                # Saved for the parent, then fatal: the other rank may be left in a collective.
                write_json(path, {"index": config["index"], "error": traceback.format_exc()})
                raise
            write_json(path, result)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

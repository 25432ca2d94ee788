"""FusedAdamW under torch.distributed wrappers, 2 processes on the CPU (gloo backend).

Scenarios (one pair of worker processes each):
  ddp-grad_copy / ddp-grad_bucket_view
      DistributedDataParallel(gradient_as_bucket_view=False / True).
  zero-param_copy / zero-param_bucket_view
      ZeroRedundancyOptimizer(optimizer_class=..., parameters_as_bucket_view=False / True)
      on a DDP-wrapped model (each rank steps only its partition, then ZeRO broadcasts it).
  fsdp2
      torch.distributed.fsdp.fully_shard on a CPU device mesh: every Linear, then the root;
      the optimizer is built on the sharded (DTensor) parameters.
  tensor_parallel
      Tensor parallelism on a CPU device mesh (torch.distributed.tensor.parallel): the first
      two Linears ColwiseParallel (weight and bias Shard(0)), the last RowwiseParallel
      (weight Shard(1), bias Replicate), the LayerNorm's weight and bias Replicate; every
      rank trains on the same batch, as tensor parallelism does.

  low_bytes
      FusedAdamW's low-byte options (issue 17; LOW_BYTES_OPTIONS) under DDP and FSDP2, each
      against a single-process run of the unsharded model made in the same workers;
      stochastic rounding under tensor parallelism; and where stochastic rounding's bits come
      from for DTensors placed Shard(0), Shard(1) and Replicate (noam_ext._storage.shard_rounding).
      Its runs and checks are its own (the section "The low-byte options" below).

In each of the other scenarios the same small MLP (Linear/LayerNorm/Linear/Linear, biases, float32,
3509 parameters) is trained for STEPS steps on data that differs per rank, in four runs
from the same initial weights and data: {torch.optim.AdamW(foreach=False), FusedAdamW}
x {constant lr, Noam schedule}. torch's runs come first; they are the reference and
double as a check of the harness itself (test_torch_reference).

Checks, per scenario and schedule variant:
  (a) after training, the full parameters are bitwise equal on both ranks;
  (b) FusedAdamW's parameters equal torch's under the same wrapper, within float32 rounding;
  (c) the optimizer state: "step" == STEPS on both ranks, exp_avg and exp_avg_sq for every
      parameter the rank optimizes, of the parameter's shape, tensor type and placements
      (DTensors placed like their parameters under FSDP2 and tensor parallelism, as torch's);
      under ZeRO each parameter is optimized by exactly one rank;
  and the loss went down.

How the processes are run: each rank is a fresh Python running this file as a script
(``python test_distributed.py --worker ...``), not torch.multiprocessing.spawn: under
pytest's --import-mode=importlib this module is not importable by name in a child, so a
spawned child could not unpickle a worker function defined here. The ranks rendezvous
through a FileStore in the scenario's tmp folder (no TCP port to race for), write one
torch.save file per (rank, run) there, and the assertions run here in the parent. An
exception inside a run is saved with its traceback and reported by the tests of that run;
a crash or hang of a whole worker is reported with the end of its output.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

WORLD_SIZE = 2
STEPS = 6
# OUT_FEATURES is odd on purpose: FSDP2 then shards the last Linear unevenly (3 + 2 rows),
# so its local shards are views into padded storage and differ in size between the ranks.
IN_FEATURES, HIDDEN, OUT_FEATURES, BATCH = 16, 48, 5, 64
# Identical hyperparameters for both optimizers.
CONSTANT_LR = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.01)
NOAM_LR = dict(lr=1.0, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.01)
D_MODEL, WARMUP = 16, 3

SCENARIOS = ["ddp-grad_copy", "ddp-grad_bucket_view", "zero-param_copy", "zero-param_bucket_view", "fsdp2",
             "tensor_parallel"]
VARIANTS = ["constant_lr", "noam"]
IMPLS = ["torch", "fused"]
# The runs of a scenario, in the order the workers do them: torch's first, so that the
# reference is complete even if one of ours fails, crashes or hangs.
RUN_ORDER = [(impl, variant) for impl in IMPLS for variant in VARIANTS]
LOW_BYTES = "low_bytes"

COLLECTIVE_TIMEOUT_S = 30           # gloo: a rank stuck in a collective fails after this
SCENARIO_TIMEOUT_S = 240            # parent: a scenario's workers are killed after this

# (b) Tolerance of FusedAdamW against torch.optim.AdamW(foreach=False). Not bitwise: the
# moment updates (exp_avg, exp_avg_sq) follow torch's single-tensor path operation for
# operation and agree bit for bit given the same gradients (tests/optimizer/test_parity.py), but
# torch's CPU Tensor.sqrt (MKL VML in the x86 build) is not correctly rounded while
# noam_ext uses the IEEE square root, so the denominator sqrt(v_hat) + eps, and with it
# the parameter, can differ by about an ulp of the update in a few percent of the
# elements (docs/adamw.md, "Rounding"). Those ulps change the next forward pass, so the
# gradients then differ slightly too; over a few steps that stays far below these
# tolerances, while a real mistake (a wrong lr, bias correction or a stale/unsynchronised
# update) is off by > 1e-3 relative.
RTOL, ATOL = 1e-5, 1e-6


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard          # torch >= 2.6
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard  # torch 2.4, 2.5
    return fully_shard


def _tensor_parallel_api():
    """(parallelize_module, ColwiseParallel, RowwiseParallel, distribute_module,
    distribute_tensor, Replicate)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    try:
        from torch.distributed.tensor import Replicate, distribute_module, distribute_tensor   # torch >= 2.5
    except ImportError:
        from torch.distributed._tensor import Replicate, distribute_module, distribute_tensor
    return parallelize_module, ColwiseParallel, RowwiseParallel, distribute_module, distribute_tensor, Replicate


def _skip_reason() -> str | None:
    if not dist.is_available():
        return "torch.distributed is not available in this torch build (torch.distributed.is_available() is False)"
    if not dist.is_gloo_available():
        return "the gloo backend is not available in this torch build (torch.distributed.is_gloo_available() is False)"
    return None


# ================================================================================================
# Worker side (runs in the child processes)
# ================================================================================================

def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(IN_FEATURES, HIDDEN), torch.nn.LayerNorm(HIDDEN), torch.nn.Tanh(),
        torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Tanh(),
        torch.nn.Linear(HIDDEN, OUT_FEATURES))


# make_wide_model(): every parameter's last dimension is whole 256-element blocks, and FSDP2's
# dim-0 shards on two ranks (256 + 256 rows; 3 + 2 rows of the last Linear; 256 + 256 of the
# bias) hold whole blocks, so the 8-bit sharded step is the unsharded one bit for bit.
WIDE_IN, WIDE_HIDDEN = 256, 512


def make_wide_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(WIDE_IN, WIDE_HIDDEN), torch.nn.Tanh(),
                               torch.nn.Linear(WIDE_HIDDEN, OUT_FEATURES, bias=False))


def make_wide_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4321 + rank)
    x = torch.randn(BATCH, WIDE_IN, generator=g)
    return x, torch.tanh(x[:, :OUT_FEATURES]) + 0.05 * torch.randn(BATCH, OUT_FEATURES, generator=g)


def make_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed regression batch per rank: different inputs on each rank, one target map."""
    teacher = torch.randn(IN_FEATURES, OUT_FEATURES, generator=torch.Generator().manual_seed(99))
    g = torch.Generator().manual_seed(1234 + rank)
    x = torch.randn(BATCH, IN_FEATURES, generator=g)
    y = torch.tanh(x @ teacher) + 0.05 * torch.randn(BATCH, OUT_FEATURES, generator=g)
    return x, y


def _global_mean(value: torch.Tensor) -> float:
    value = value.detach().clone().reshape(1)
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


def _full(t: torch.Tensor) -> torch.Tensor:
    """The full (unsharded) value of a parameter, as a plain tensor."""
    if hasattr(t, "full_tensor"):   # DTensor (FSDP2)
        t = t.full_tensor()
    return t.detach().clone().contiguous()


def _kind(t: torch.Tensor) -> tuple[str, tuple[int, ...], tuple[str, ...]]:
    """("DTensor" or "Tensor", the (global) shape, the DTensor placements): what a state
    tensor must match."""
    if hasattr(t, "full_tensor"):
        return ("DTensor", tuple(t.shape), tuple(_placement_name(p) for p in t.placements))
    return ("Tensor", tuple(t.shape), ())


def _placement_name(placement) -> str:
    """"Shard(0)", "Replicate", ...: the same text on every torch version."""
    if placement.is_shard():
        return f"Shard({placement.dim})"
    if placement.is_replicate():
        return "Replicate"
    return str(placement)


def _tensor_parallel(model: torch.nn.Module) -> None:
    """Places make_model()'s parameters for tensor parallelism on a CPU mesh of all ranks:
    Linear 0 and 1 colwise (Shard(0)), Linear 2 rowwise (weight Shard(1), bias Replicate),
    the LayerNorm replicated. Linear 0 hands the LayerNorm a replicated DTensor."""
    from torch.distributed.device_mesh import init_device_mesh
    parallelize_module, Colwise, Rowwise, distribute_module, distribute_tensor, Replicate = _tensor_parallel_api()
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    parallelize_module(model, mesh, {"0": Colwise(output_layouts=Replicate(), use_local_output=False),
                                     "3": Colwise(), "5": Rowwise()})

    def replicate(_name, module, mesh):
        for name, p in list(module.named_parameters(recurse=False)):
            module.register_parameter(name, torch.nn.Parameter(distribute_tensor(p.data, mesh, [Replicate()])))
    distribute_module(model[1], mesh, replicate)


def _make_optimizer(impl: str, variant: str, params, zero: bool, bucket_view: bool):
    """The optimizer and, for torch's Noam run, its LR scheduler. Returns
    (optimizer, scheduler or None, the optimizer that holds the state)."""
    import noam_ext

    kwargs = dict(CONSTANT_LR if variant == "constant_lr" else NOAM_LR)
    if impl == "torch":
        cls = torch.optim.AdamW
        kwargs["foreach"] = False
    else:
        cls = noam_ext.FusedAdamW
        if variant == "noam":
            kwargs["schedule"] = noam_ext.Noam(d_model=D_MODEL, warmup_steps=WARMUP)
    if zero:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        opt = ZeroRedundancyOptimizer(params, optimizer_class=cls,
                                      parameters_as_bucket_view=bucket_view, **kwargs)
        local = opt.optim
    else:
        opt = cls(params, **kwargs)
        local = opt
    scheduler = None
    if impl == "torch" and variant == "noam":
        scheduler = noam_ext.TransformerLRScheduler(opt, d_model=D_MODEL, warmup_steps=WARMUP)
    return opt, scheduler, local


def train(scenario: str, impl: str, variant: str, rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    kind, _, mode = scenario.partition("-")
    model = make_model()
    names = {id(p): name for name, p in model.named_parameters()}
    if kind == "ddp":
        wrapped = DDP(model, gradient_as_bucket_view=(mode == "grad_bucket_view"))
    elif kind == "zero":
        wrapped = DDP(model)
    elif kind == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        fully_shard = _fully_shard()
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        for module in model:
            if isinstance(module, torch.nn.Linear):
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        wrapped = model
        # fully_shard replaced the parameters by sharded DTensor parameters.
        names = {id(p): name for name, p in model.named_parameters()}
    elif kind == "tensor_parallel":
        _tensor_parallel(model)
        wrapped = model
        names = {id(p): name for name, p in model.named_parameters()}
    else:
        raise ValueError(scenario)

    opt, scheduler, local = _make_optimizer(impl, variant, list(wrapped.parameters()),
                                            zero=(kind == "zero"), bucket_view=(mode == "param_bucket_view"))
    # Tensor parallelism splits the weights, not the data: every rank sees the same batch.
    x, y = make_batch(0 if kind == "tensor_parallel" else rank)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(wrapped(x), y)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(_global_mean(loss))

    # The full parameters, gathered in the same order on every rank (collectives for FSDP2).
    params = {name: _full(p) for name, p in model.named_parameters()}
    # Final loss, evaluated on a plain copy of the model (independent of the wrapper).
    plain = make_model()
    plain.load_state_dict(params)
    with torch.no_grad():
        final_loss = _global_mean(torch.nn.functional.mse_loss(plain(x), y))

    state = {}
    for group in local.param_groups:
        for p in group["params"]:
            s = local.state.get(p, {})
            step = s.get("step")
            state[names[id(p)]] = {
                "keys": sorted(s),
                "step": None if step is None else float(step),
                # Same shape, tensor type and placements as the parameter: a DTensor under
                # FSDP2 and tensor parallelism, as torch.optim.AdamW's are
                # (torch.distributed.checkpoint relies on it).
                "moments": {k: _kind(s[k]) for k in ("exp_avg", "exp_avg_sq") if k in s},
                "param": _kind(p),
            }
    return {
        "params": params,
        "losses": losses,
        "final_loss": final_loss,
        "state": state,
        "lrs": [float(g["lr"]) for g in opt.param_groups],
    }


# ---- The low-byte options (scenario "low_bytes"; the checks are in the parent section below) ----

# name -> (parameter dtype, gradient dtype the step reads (None: the parameter's), FusedAdamW options)
LOW_BYTES_OPTIONS = {
    "master-float32": (torch.bfloat16, None, dict(master_weights="float32")),
    "remainder": (torch.bfloat16, None, dict(master_weights="remainder")),
    "remainder-bf16-moments": (torch.bfloat16, None, dict(master_weights="remainder", moment_dtype=torch.bfloat16)),
    "fp32-params-bf16-moments": (torch.float32, None, dict(moment_dtype=torch.bfloat16)),
    "stochastic-rounding": (torch.bfloat16, None, dict(stochastic_rounding=True, seed=1234)),
    "fp32-params-bf16-grads": (torch.float32, torch.bfloat16, {}),
    "8bit": (torch.float32, None, dict(moment_dtype="8bit")),
    "8bit-bf16-stochastic-rounding": (torch.bfloat16, None, dict(moment_dtype="8bit", stochastic_rounding=True,
                                                                 seed=1234)),
}
LOW_BYTES_WRAPPERS = ["ddp", "fsdp2"]
# 8-bit moments under FSDP2: make_model()'s parameters are 16 and 48 wide, so no shard holds
# whole 256-element blocks of its last dimension and each keeps float32 moments (documented,
# with a warning: noam_ext._storage.eight_bit_for); that run is not the single-process 8-bit
# run. The 8-bit layouts that shard exactly run on make_wide_model() (EIGHT_BIT_SHARDED below).
# Under ZeRO (ZeroRedundancyOptimizer over DDP: each rank steps whole parameters of its own,
# then broadcasts them) 8-bit runs with float32 parameters; stochastic rounding is left out
# there: each rank's optimizer numbers its parameters anew, and the rounding streams follow a
# parameter's place in its optimizer.
FLOAT_MOMENTS_WHEN_SHARDED = {"8bit", "8bit-bf16-stochastic-rounding"}
# 8-bit moments on make_wide_model(), whose every parameter shards into whole blocks under
# FSDP2 on two ranks: name -> (parameter dtype, FusedAdamW options).
EIGHT_BIT_SHARDED = {
    "8bit-wide": (torch.float32, dict(moment_dtype="8bit")),
    "8bit-wide-bf16-stochastic-rounding": (torch.bfloat16, dict(moment_dtype="8bit", stochastic_rounding=True,
                                                                seed=1234)),
}
# The single-process runs first: they are the reference of the sharded ones.
LOW_BYTES_RUNS = ([(wrapper, option) for wrapper in ["single"] + LOW_BYTES_WRAPPERS for option in LOW_BYTES_OPTIONS]
                  + [(wrapper, option) for option in EIGHT_BIT_SHARDED for wrapper in ("single", "fsdp2")]
                  + [("zero", "8bit")]
                  + [("tensor_parallel", "stochastic-rounding"), ("shard_rounding", "stochastic-rounding"),
                     ("eight_bit_placements", "8bit"), ("eight_bit_checkpoints", "8bit")])
LOW_BYTES_TIMEOUT_S = 560           # 31 runs


def runs_of(scenario: str) -> list[tuple[str, str]]:
    return LOW_BYTES_RUNS if scenario == LOW_BYTES else RUN_ORDER


def _master_of(state: dict):
    return state.get("master_param", state.get("master_remainder"))


def _read_gradient_as(p: torch.Tensor, dtype: torch.dtype) -> None:
    """Hands the step p's gradient (as the wrapper left it) in `dtype`: bfloat16 gradients of
    float32 parameters. torch >= 2.10 asks for p.grad_dtype, set while p.grad is None;
    _reset_grad_dtype sets it back before the next backward, whose wrappers (DDP's buckets,
    FSDP2's reduce-scatter) write gradients of the parameter's dtype."""
    grad = p.grad.to(dtype)
    if hasattr(p, "grad_dtype"):
        p.grad = None
        p.grad_dtype = dtype
        p.grad = grad
    else:
        p.grad.data = grad


def _reset_grad_dtype(p: torch.Tensor) -> None:
    if hasattr(p, "grad_dtype") and p.grad is None:
        p.grad_dtype = p.dtype


def train_low_bytes(wrapper: str, option: str, rank: int) -> dict:
    """One option under one wrapper ("single": the plain model in this process alone).
    Every rank trains on the same batch, so that the wrappers' gradient averages are the
    single-process gradients exactly (the mean of two equal values, in any dtype): the
    single-process run is then the sharded runs' reference, bit for bit."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import noam_ext

    if wrapper == "shard_rounding":
        return _shard_rounding_placements()
    if wrapper == "eight_bit_placements":
        return _eight_bit_placements()
    if wrapper == "eight_bit_checkpoints":
        return _eight_bit_checkpoints(rank)
    if option in EIGHT_BIT_SHARDED:
        param_dtype, options = EIGHT_BIT_SHARDED[option]
        grad_dtype, new_model, batch = None, make_wide_model, make_wide_batch
    else:
        param_dtype, grad_dtype, options = LOW_BYTES_OPTIONS[option]
        new_model, batch = make_model, make_batch
    model = new_model().to(param_dtype)
    wrapped = model
    if wrapper == "ddp":
        wrapped = DDP(model)
    elif wrapper == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        fully_shard = _fully_shard()
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        for module in model:
            if isinstance(module, torch.nn.Linear):
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif wrapper == "tensor_parallel":
        _tensor_parallel(model)
    elif wrapper == "zero":
        wrapped = DDP(model)
    elif wrapper != "single":
        raise ValueError(wrapper)
    names = {id(p): name for name, p in model.named_parameters()}
    caught = []   # warnings of the optimizer's construction (not under ZeRO) and steps
    if wrapper == "zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer
        opt = ZeroRedundancyOptimizer(list(wrapped.parameters()), optimizer_class=noam_ext.FusedAdamW,
                                      parameters_as_bucket_view=False, **CONSTANT_LR, **options)
    else:
        with warnings.catch_warnings(record=True) as caught_here:
            warnings.simplefilter("always")
            opt = noam_ext.FusedAdamW(list(wrapped.parameters()), **CONSTANT_LR, **options)
        caught += caught_here
    x, y = batch(0)
    x = x.to(param_dtype)
    losses = []
    for step in range(STEPS):
        if step == STEPS // 2 and wrapper in ("single", "ddp", "fsdp2"):
            # A round trip through state_dict(), as a resumed run makes (the same in every run).
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        opt.zero_grad()
        if grad_dtype is not None:
            for p in model.parameters():
                _reset_grad_dtype(p)
        loss = torch.nn.functional.mse_loss(wrapped(x).float(), y)
        loss.backward()
        if grad_dtype is not None:
            for p in model.parameters():
                _read_gradient_as(p, grad_dtype)
        with warnings.catch_warnings(record=True) as caught_here:
            warnings.simplefilter("always")
            opt.step()
        caught += caught_here
        losses.append(loss.item())   # the same batch on every rank: each rank's loss is the loss

    params = {name: _full(p) for name, p in model.named_parameters()}
    plain = new_model().to(param_dtype)
    plain.load_state_dict(params)
    with torch.no_grad():
        final_loss = torch.nn.functional.mse_loss(plain(x).float(), y).item()
    state = {}
    for p in opt.param_groups[0]["params"]:
        s = opt.state.get(p, {})
        master = _master_of(s)
        state[names[id(p)]] = {
            "keys": sorted(s),
            "step": None if s.get("step") is None else float(s["step"]),
            "param": _kind(p),
            "moments": {k: (_kind(s[k]), s[k].dtype) for k in ("exp_avg", "exp_avg_sq") if k in s},
            "codes": {k: (_kind(s[k]), s[k].dtype) for k in ("exp_avg_codes", "exp_avg_sq_codes") if k in s},
            "scales": {k: (_kind(s[k]), s[k].dtype) for k in ("exp_avg_absmax", "exp_avg_sq_absmax") if k in s},
            "master": None if master is None else (_kind(master), master.dtype),
            # The local values of replicated parameters (tensor parallelism): what each rank holds.
            "local": p.to_local().detach().clone() if hasattr(p, "to_local") else None,
        }
    return {"params": params, "losses": losses, "final_loss": final_loss, "state": state,
            "seed": opt.param_groups[0].get("seed"),
            "warnings": [str(w.message) for w in caught]}


def _shard_rounding_placements() -> dict:
    """Two stochastically rounded steps of one bfloat16 parameter (5 x 7: uneven shards),
    placed Shard(0), Shard(1) and Replicate over both ranks, with the same full gradient,
    against the same steps of the unsharded parameter in this process. Returns per
    placement this rank's local result, the unsharded result's part at the same place, the
    local result of a second identical run, and (offset, salt) from shard_rounding."""
    from torch.distributed.device_mesh import init_device_mesh

    import noam_ext
    from noam_ext._storage import shard_rounding
    try:
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    except ImportError:
        from torch.distributed._tensor import Replicate, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    generator = torch.Generator().manual_seed(7)
    full = torch.randn(5, 7, generator=generator).to(torch.bfloat16)
    grad = torch.randn(5, 7, generator=generator).to(torch.bfloat16)
    options = dict(CONSTANT_LR, stochastic_rounding=True, seed=31)

    def two_steps(value, place):
        p = torch.nn.Parameter(place(value.clone()))
        opt = noam_ext.FusedAdamW([p], **options)
        for _ in range(2):
            p.grad = place(grad.clone())
            opt.step()
        return p

    unsharded = two_steps(full, lambda t: t).detach()
    out = {}
    for placement in (Shard(0), Shard(1), Replicate()):
        def place(t, placement=placement):
            return distribute_tensor(t, mesh, [placement])
        p = two_steps(full, place)
        offset, salt = shard_rounding(p)
        out[_placement_name(placement)] = {
            "local": p.to_local().detach().clone(),
            "unsharded_here": place(unsharded).to_local().clone(),
            "again": two_steps(full, place).to_local().detach().clone(),
            "offset": offset, "salt": salt,
        }
    return {"placements": out}


def _eight_bit_placements() -> dict:
    """Two 8-bit steps (amsgrad: all three moments; the state_dict() reloaded between them) of
    parameters placed over both ranks, with the same full gradient, against the same steps of
    the unsharded parameter in this process. Per case: this rank's local result and the
    unsharded result's part at the same place (with 8-bit and with float moments), whether the
    state is 8-bit, whether its gathered codes and scales are the unsharded ones, the scales'
    kind, the warnings, and what differs after loading full checkpoints into a sharded optimizer."""
    from torch.distributed.device_mesh import init_device_mesh

    import noam_ext
    from noam_ext._storage import dequantize_moment
    try:
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    except ImportError:
        from torch.distributed._tensor import Replicate, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    mesh_2d = init_device_mesh("cpu", (1, WORLD_SIZE))   # as HSDP: replicas x shards
    options = dict(CONSTANT_LR, moment_dtype="8bit", amsgrad=True)
    f32, bf16 = torch.float32, torch.bfloat16
    # name -> (shape, dtype, mesh, placements)
    cases = {"4x512 Shard(0)": ((4, 512), f32, mesh, [Shard(0)]),
             "4x512 Shard(1)": ((4, 512), f32, mesh, [Shard(1)]),
             "4x512 Replicate": ((4, 512), f32, mesh, [Replicate()]),
             "512 Shard(0)": ((512,), f32, mesh, [Shard(0)]),
             "1x512 Shard(0), rank 1 empty": ((1, 512), f32, mesh, [Shard(0)]),
             "4x512 (Replicate, Shard(1)) on a 1x2 mesh": ((4, 512), f32, mesh_2d, [Replicate(), Shard(1)]),
             "4x768 Shard(1)": ((4, 768), f32, mesh, [Shard(1)]),
             "300 Shard(0)": ((300,), f32, mesh, [Shard(0)]),
             "6x48 Shard(0)": ((6, 48), f32, mesh, [Shard(0)]),
             "6x48 bfloat16 Shard(0)": ((6, 48), bf16, mesh, [Shard(0)])}

    def two_steps(full, grad, place, options=options):
        p = torch.nn.Parameter(place(full.clone()))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = noam_ext.FusedAdamW([p], **options)
            for step in range(2):
                if step == 1:   # a round trip through state_dict(), as a resumed run makes
                    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
                p.grad = place(grad.clone())
                opt.step()
        return p, opt, [str(w.message) for w in caught]

    def loaded_into(place, full, state_dict):
        """The state of an optimizer (of a parameter placed by `place`) that loaded state_dict."""
        opt = noam_ext.FusedAdamW([torch.nn.Parameter(place(full.clone()))], **options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.load_state_dict(copy.deepcopy(state_dict))
        return next(iter(opt.state.values()))

    moments = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    out = {}
    for name, (shape, dtype, case_mesh, placements) in cases.items():
        generator = torch.Generator().manual_seed(11)
        full = torch.randn(shape, generator=generator).to(dtype)
        grad = torch.randn(shape, generator=generator).to(dtype)
        unsharded, unsharded_opt, _ = two_steps(full, grad, lambda t: t)
        reference = unsharded_opt.state[unsharded]
        decoded_reference = {key: dequantize_moment(unsharded, key, reference) for key in moments}
        float_moments, _, _ = two_steps(full, grad, lambda t: t, {**options, "moment_dtype": None})

        def place(t, case_mesh=case_mesh, placements=placements):
            return distribute_tensor(t, case_mesh, placements)
        p, opt, caught = two_steps(full, grad, place)
        state = opt.state[p]
        eight_bit = "exp_avg_codes" in state
        # Full checkpoints loaded into a sharded optimizer (load_state_dict): the unsharded
        # optimizer's state_dict() (codes and scales), and the same in torch.optim.AdamW's
        # format (float moments): each rank keeps its shards, as codes and scales or as floats.
        differs = []
        for form, state_dict in (("8-bit", unsharded_opt.state_dict()),
                                 ("float", noam_ext.dequantized_state_dict(unsharded_opt.state_dict()))):
            loaded = loaded_into(place, full, state_dict)
            if eight_bit:   # the codes and scales the unsharded optimizer holds after the same load
                expected = loaded_into(lambda t: t, full, state_dict)
                differs += [f"{form}: {key}" for key in reference if key != "step"
                            and not torch.equal(loaded[key].full_tensor(), expected[key])]
            else:
                differs += [f"{form}: {key}" for key in moments if _kind(loaded[key]) != _kind(p)
                            or not torch.equal(loaded[key].full_tensor(),
                                               decoded_reference[key].to(state[key].dtype))]
        if eight_bit:
            # The sharded state_dict() in torch.optim.AdamW's format: DTensor moments placed as
            # the parameter, each rank decoding its own shards.
            decoded = noam_ext.dequantized_state_dict(opt.state_dict())["state"][0]
            differs += [f"dequantized {key}" for key in moments if _kind(decoded[key]) != _kind(p)
                        or not torch.equal(decoded[key].full_tensor(), decoded_reference[key])]
        gathered = {key: (state[key].full_tensor() if eight_bit else None) for key in reference if key != "step"}
        out[name] = {
            "local": p.to_local().detach().clone(),
            "unsharded_here": place(unsharded.detach()).to_local().clone(),
            "float_moments_here": place(float_moments.detach()).to_local().clone(),
            "eight_bit": eight_bit,
            "float_moments": {k: (_kind(state[k]), state[k].dtype) for k in ("exp_avg", "exp_avg_sq") if k in state},
            "param": _kind(p),
            "gathered_state_differs": [key for key, value in gathered.items()
                                       if value is None or value.shape != reference[key].shape
                                       or not torch.equal(value, reference[key])],
            "scales": _kind(state["exp_avg_absmax"]) if eight_bit else None,
            "warnings": caught,
            "loaded_differs": differs,
        }
    return {"placements": out}


def _eight_bit_checkpoints(rank: int) -> dict:
    """8-bit checkpoints between FSDP2 and one process (make_wide_model(), amsgrad): the same
    training in one process and under FSDP2; the sharded run's full state dict
    (torch.distributed.checkpoint's get_optimizer_state_dict) against the single run's
    state_dict(); then each direction of resuming, continued for 2 steps beside the single run:
    the gathered state loaded into a plain optimizer, the single run's state_dict() loaded into a
    sharded optimizer by load_state_dict, and by set_optimizer_state_dict. Returns the names
    of what differs."""
    import shutil
    import tempfile

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh

    import noam_ext
    options = dict(CONSTANT_LR, moment_dtype="8bit", amsgrad=True)
    x, y = make_wide_batch(0)
    full_options = StateDictOptions(full_state_dict=True)

    def plain(params=None, new_model=make_wide_model):
        model = new_model()
        if params is not None:
            model.load_state_dict(params)
        return model, noam_ext.FusedAdamW(model.parameters(), **options)

    def sharded(params=None, new_model=make_wide_model):
        model, _ = plain(params, new_model)
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        fully_shard = _fully_shard()
        for module in model:
            if isinstance(module, torch.nn.Linear):
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # make_model()'s shards keep float moments: said elsewhere
            return model, noam_ext.FusedAdamW(model.parameters(), **options)

    def train(model, opt, steps, data=(x, y)):
        for _ in range(steps):
            opt.zero_grad()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.nn.functional.mse_loss(model(data[0]), data[1]).backward()
                opt.step()

    def params_of(model):
        return {name: _full(p) for name, p in model.named_parameters()}

    def differ(a, b):
        return [name for name in a if not torch.equal(a[name], b[name])]

    names = [name for name, _ in make_wide_model().named_parameters()]
    single, single_opt = plain()
    train(single, single_opt, STEPS)
    shard, shard_opt = sharded()
    train(shard, shard_opt, STEPS)
    out = {"trained": differ(params_of(single), params_of(shard))}
    out["scales"] = {name: _kind(shard_opt.state[p]["exp_avg_absmax"]) for name, p in shard.named_parameters()}
    single_sd = copy.deepcopy(single_opt.state_dict())
    full = get_optimizer_state_dict(shard, shard_opt, options=full_options)
    mismatch = []
    for i, name in enumerate(names):
        mine, theirs = single_sd["state"][i], full["state"][name]
        if sorted(mine) != sorted(theirs):
            mismatch.append(f"{name}: keys {sorted(mine)} vs {sorted(theirs)}")
            continue
        for key, value in mine.items():
            other = theirs[key]
            if not (isinstance(other, torch.Tensor) and other.shape == value.shape and other.dtype == value.dtype
                    and torch.equal(other, value)):
                mismatch.append(f"{name}: {key}")
    out["full_state_dict"] = mismatch
    indexed = {"state": {i: full["state"][name] for i, name in enumerate(names)},
               "param_groups": single_sd["param_groups"]}
    resumed, resumed_opt = plain(params_of(shard))
    resumed_opt.load_state_dict(copy.deepcopy(indexed))
    reloaded, reloaded_opt = sharded(params_of(single))
    reloaded_opt.load_state_dict(copy.deepcopy(single_sd))
    via_dcp, via_dcp_opt = sharded(params_of(single))
    set_optimizer_state_dict(via_dcp, via_dcp_opt, copy.deepcopy(full), options=full_options)
    # A sharded checkpoint on disk (torch.distributed.checkpoint.save of the DTensor state),
    # loaded back into a sharded optimizer, and resharded into a one-process optimizer on each rank.
    folder = [tempfile.mkdtemp(prefix="noam_ext_dcp_") if rank == 0 else None]
    dist.broadcast_object_list(folder, src=0)
    dcp.save({"optim": get_optimizer_state_dict(shard, shard_opt)}, checkpoint_id=folder[0])
    from_disk = {}
    for what, make in (("sharded", sharded), ("one process", plain)):
        model, opt = make(params_of(single))
        template = {"optim": get_optimizer_state_dict(model, opt)}
        dcp.load(template, checkpoint_id=folder[0])
        set_optimizer_state_dict(model, opt, template["optim"])
        from_disk[f"saved sharded->{what} (torch.distributed.checkpoint)"] = (model, opt)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(folder[0], ignore_errors=True)
    runs = {"single": (single, single_opt), "sharded": (shard, shard_opt), "sharded->single": (resumed, resumed_opt),
            "single->sharded (load_state_dict)": (reloaded, reloaded_opt),
            "single->sharded (set_optimizer_state_dict)": (via_dcp, via_dcp_opt), **from_disk}
    for model, opt in runs.values():
        train(model, opt, 2)
    reference = params_of(single)
    out["resumed"] = {what: differ(reference, params_of(model)) for what, (model, _) in runs.items()}

    # Where the forms differ: make_model()'s FSDP2 shards keep float32 moments (16 and 48 wide),
    # one process keeps 8-bit ones. set_optimizer_state_dict(full_state_dict=True) merges the
    # checkpoint into the optimizer's own state (a moment then in both forms: settle_moments)
    # and must convert it as load_state_dict of the same checkpoint does.
    narrow_batch = make_batch(0)

    def state_differs(a_opt, a_model, b_opt, b_model):
        found = []
        for (name, pa), pb in zip(a_model.named_parameters(), b_model.parameters()):
            sa, sb = a_opt.state[pa], b_opt.state[pb]
            if sorted(sa) != sorted(sb):
                found.append(f"{name}: keys {sorted(sa)} vs {sorted(sb)}")
            found += [f"{name}: {key}" for key in sa if key in sb and not torch.equal(_full(sa[key]), _full(sb[key]))]
        return found

    narrow, narrow_opt = sharded(new_model=make_model)
    train(narrow, narrow_opt, 2, narrow_batch)
    narrow_full = get_optimizer_state_dict(narrow, narrow_opt, options=full_options)
    merged, merged_opt = plain(params_of(narrow), make_model)
    set_optimizer_state_dict(merged, merged_opt, copy.deepcopy(narrow_full), options=full_options)
    loaded, loaded_opt = plain(params_of(narrow), make_model)
    loaded_opt.load_state_dict({"state": {i: copy.deepcopy(narrow_full["state"][name])
                                          for i, (name, _) in enumerate(loaded.named_parameters())},
                                "param_groups": copy.deepcopy(loaded_opt.state_dict()["param_groups"])})
    out["float shards -> one process 8-bit"] = state_differs(merged_opt, merged, loaded_opt, loaded)
    one, one_opt = plain(new_model=make_model)
    train(one, one_opt, 2, narrow_batch)
    one_full = get_optimizer_state_dict(one, one_opt, options=full_options)
    merged, merged_opt = sharded(params_of(one), make_model)
    set_optimizer_state_dict(merged, merged_opt, copy.deepcopy(one_full), options=full_options)
    decoded = noam_ext.dequantized_state_dict(one_opt.state_dict())["state"]
    out["one process 8-bit -> float shards"] = [
        f"{name}: {key}" for i, (name, p) in enumerate(merged.named_parameters()) for key in decoded[i]
        if key != "step" and not torch.equal(_full(merged_opt.state[p][key]), decoded[i][key])]
    return out


def worker_main(scenario: str, rank: int, out_dir: Path) -> None:
    torch.set_num_threads(1)    # two ranks on a 2-core machine
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank,
                            world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        for impl, variant in runs_of(scenario):
            started = time.perf_counter()
            try:
                result = (train_low_bytes(impl, variant, rank) if scenario == LOW_BYTES
                          else train(scenario, impl, variant, rank))
            except Exception:
                result = {"error": traceback.format_exc()}
            result["seconds"] = time.perf_counter() - started
            torch.save(result, out_dir / f"{impl}-{variant}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# ================================================================================================
# Parent side (pytest)
# ================================================================================================

pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


@dataclass
class ScenarioRun:
    scenario: str
    out_dir: Path
    failure: str | None = None      # a worker crashed or timed out: why, with its output
    results: dict = field(default_factory=dict)   # (impl, variant) -> [rank0 result, rank1 result]

    def raw(self, impl: str, variant: str) -> list[dict | None]:
        """Both ranks' saved results of one run (None: that rank saved none)."""
        key = (impl, variant)
        if key not in self.results:
            paths = [self.out_dir / f"{impl}-{variant}-rank{rank}.pt" for rank in range(WORLD_SIZE)]
            self.results[key] = [torch.load(path, weights_only=True) if path.exists() else None
                                 for path in paths]
        return self.results[key]

    def failed(self, impl: str, variant: str) -> bool:
        return any(r is None or "error" in r for r in self.raw(impl, variant))

    def get(self, impl: str, variant: str) -> list[dict]:
        """Both ranks' results of one run; fails the test with every rank's traceback."""
        results = self.raw(impl, variant)
        problems = []
        for rank, result in enumerate(results):
            if result is None:
                problems.append(f"--- rank {rank} saved no result for this run")
            elif "error" in result:
                problems.append(f"--- rank {rank} raised:\n{result['error']}")
        if problems:
            message = f"{self.scenario}: the {impl}/{variant} run failed\n" + "\n".join(problems)
            order = runs_of(self.scenario)
            earlier = order[:order.index((impl, variant))]
            earlier = [f"{i}/{v}" for i, v in earlier if self.failed(i, v)]
            if earlier:
                message += (f"\nNote: the earlier run(s) {', '.join(earlier)} of this scenario failed too. A "
                            "failure on one rank only leaves the other waiting in a collective and the "
                            "process group unusable, so a gloo timeout, 'pair closure' or 'connection reset' "
                            "here may only be a consequence of that earlier failure.")
            if self.failure:
                message += f"\nWorker processes: {self.failure}"
            pytest.fail(message, pytrace=False)
        return results


_RUNS: dict[str, ScenarioRun] = {}


def _run_workers(scenario: str, out_dir: Path) -> ScenarioRun:
    """Runs both ranks of one scenario to completion (or its timeout)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    timeout = LOW_BYTES_TIMEOUT_S if scenario == LOW_BYTES else SCENARIO_TIMEOUT_S
    deadline = time.monotonic() + timeout
    procs, logs, failure = [], [], []
    try:
        for rank in range(WORLD_SIZE):
            logs.append(open(out_dir / f"rank{rank}.log", "w+"))
            procs.append(subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--worker", scenario, str(rank), str(out_dir)],
                stdout=logs[-1], stderr=subprocess.STDOUT, env=env, cwd=str(out_dir)))
        for rank, proc in enumerate(procs):
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                failure.append(f"rank {rank} was still running after {timeout} s and was killed")
    finally:
        for proc in procs:      # only the workers started above, also on KeyboardInterrupt
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    for rank, proc in enumerate(procs):
        if proc.returncode != 0:
            output = (out_dir / f"rank{rank}.log").read_text(errors="replace")
            failure.append(f"rank {rank} exited with code {proc.returncode}; the end of its output:\n"
                           f"{output[-6000:] or '(no output)'}")
    return ScenarioRun(scenario, out_dir, failure="\n".join(failure) or None)


@pytest.fixture
def run_of(tmp_path_factory):
    """scenario -> its ScenarioRun; the workers run once per scenario per session."""
    def get(scenario: str) -> ScenarioRun:
        if scenario == "fsdp2":
            try:
                _fully_shard()
            except ImportError:
                pytest.skip(f"this torch ({torch.__version__}) has no FSDP2 fully_shard")
        if scenario == "tensor_parallel":
            try:
                _tensor_parallel_api()
            except ImportError as e:
                pytest.skip(f"this torch ({torch.__version__}) lacks the tensor-parallel API: {e}")
        if scenario not in _RUNS:
            _RUNS[scenario] = _run_workers(scenario, tmp_path_factory.mktemp(scenario))
        return _RUNS[scenario]
    return get


scenario_param = pytest.mark.parametrize("scenario", SCENARIOS)
variant_param = pytest.mark.parametrize("variant", VARIANTS)


def _assert_ranks_bitwise_equal(results: list[dict], what: str) -> None:
    reference = results[0]["params"]
    for rank, result in enumerate(results[1:], start=1):
        assert result["params"].keys() == reference.keys()
        differ = {name: (value - reference[name]).abs().max().item()
                  for name, value in result["params"].items() if not torch.equal(value, reference[name])}
        if differ:
            listing = ", ".join(f"{name} ({diff:.3g})" for name, diff in differ.items())
            pytest.fail(f"{what}: the ranks diverged: after {STEPS} steps {len(differ)} of {len(reference)} "
                        f"parameters differ between rank 0 and rank {rank} (max |diff|): {listing}",
                        pytrace=False)


def _assert_state(results: list[dict], scenario: str, what: str) -> None:
    all_names = set(results[0]["params"])
    owners: dict[str, list[int]] = {name: [] for name in all_names}
    for rank, result in enumerate(results):
        assert result["state"], f"{what}: rank {rank}'s optimizer optimizes no parameter"
        for name, s in result["state"].items():
            owners[name].append(rank)
            assert "exp_avg" in s["keys"] and "exp_avg_sq" in s["keys"], (
                f"{what}: rank {rank}: state of {name!r} has keys {s['keys']}, "
                "expected exp_avg and exp_avg_sq")
            for key, kind in s["moments"].items():
                assert kind == s["param"], (
                    f"{what}: rank {rank}: state[{key!r}] of {name!r} is a {kind[0]} of shape {kind[1]} "
                    f"placed {kind[2]}, expected a {s['param'][0]} of shape {s['param'][1]} placed "
                    f"{s['param'][2]} like the parameter")
            assert s["step"] == STEPS, f"{what}: rank {rank}: state['step'] of {name!r} is {s['step']}, expected {STEPS}"
    if scenario.startswith("zero"):
        # ZeRO partitions the parameters: each is stepped by exactly one rank.
        bad = {name: ranks for name, ranks in owners.items() if len(ranks) != 1}
        assert not bad, f"{what}: ZeRO parameters not owned by exactly one rank (name: ranks): {bad}"
    else:
        bad = {name: ranks for name, ranks in owners.items() if ranks != list(range(WORLD_SIZE))}
        assert not bad, f"{what}: parameters not optimized by every rank (name: ranks): {bad}"


def _assert_loss_decreased(results: list[dict], what: str) -> None:
    for rank, result in enumerate(results):
        losses = result["losses"]
        assert all(l == l for l in losses), f"{what}: NaN loss on rank {rank}: {losses}"
        assert result["final_loss"] < losses[0], (
            f"{what}: the loss did not decrease on rank {rank}: first {losses[0]:.6g}, "
            f"after {STEPS} steps {result['final_loss']:.6g} (per step: {losses})")


@variant_param
@scenario_param
def test_torch_reference(run_of, scenario, variant):
    """The harness: torch.optim.AdamW under the wrapper keeps the ranks identical, has the
    expected state and trains. If this fails, the scenario itself is broken, not noam_ext."""
    torch_results = run_of(scenario).get("torch", variant)
    what = f"torch.optim.AdamW, {scenario}, {variant}"
    _assert_ranks_bitwise_equal(torch_results, what)
    _assert_state(torch_results, scenario, what)
    _assert_loss_decreased(torch_results, what)


# What _tensor_parallel places where: the scenario covers Shard(0), Shard(1) and Replicate.
TENSOR_PARALLEL_PLACEMENTS = {
    "0.weight": ("Shard(0)",), "0.bias": ("Shard(0)",), "1.weight": ("Replicate",), "1.bias": ("Replicate",),
    "3.weight": ("Shard(0)",), "3.bias": ("Shard(0)",), "5.weight": ("Shard(1)",), "5.bias": ("Replicate",)}


@variant_param
def test_tensor_parallel_placements(run_of, variant):
    """The harness: the tensor-parallel scenario's parameters are DTensors placed as
    TENSOR_PARALLEL_PLACEMENTS says, on both ranks, in torch's run and in ours."""
    run = run_of("tensor_parallel")
    for impl in IMPLS:
        for rank, result in enumerate(run.get(impl, variant)):
            placed = {name: s["param"][2] for name, s in result["state"].items()}
            assert placed == TENSOR_PARALLEL_PLACEMENTS, f"{impl}, {variant}, rank {rank}: placements {placed}"


@variant_param
@scenario_param
def test_fused_ranks_bitwise_equal(run_of, scenario, variant):
    """(a) FusedAdamW under the wrapper leaves identical full parameters on every rank."""
    _assert_ranks_bitwise_equal(run_of(scenario).get("fused", variant), f"FusedAdamW, {scenario}, {variant}")


@variant_param
@scenario_param
def test_fused_matches_torch(run_of, scenario, variant):
    """(b) FusedAdamW's parameters equal torch.optim.AdamW's under the same wrapper
    (within float32 rounding: see RTOL, ATOL), and so does the lr it ends on."""
    run = run_of(scenario)
    fused = run.get("fused", variant)
    reference = run.get("torch", variant)
    for rank in range(WORLD_SIZE):
        ours, theirs = fused[rank], reference[rank]
        for name, value in theirs["params"].items():
            torch.testing.assert_close(
                ours["params"][name], value, rtol=RTOL, atol=ATOL,
                msg=lambda m, name=name, rank=rank: (
                    f"{scenario}, {variant}, rank {rank}: FusedAdamW's {name!r} differs from "
                    f"torch.optim.AdamW's after {STEPS} steps\n{m}"))
        assert ours["lrs"] == pytest.approx(theirs["lrs"], rel=1e-12), (
            f"{scenario}, {variant}, rank {rank}: lr after training {ours['lrs']} vs torch {theirs['lrs']}")


@variant_param
@scenario_param
def test_fused_optimizer_state(run_of, scenario, variant):
    """(c) step == STEPS on both ranks, and exp_avg/exp_avg_sq for every parameter the
    rank optimizes (its partition under ZeRO, all of them otherwise)."""
    _assert_state(run_of(scenario).get("fused", variant), scenario, f"FusedAdamW, {scenario}, {variant}")


@variant_param
@scenario_param
def test_fused_loss_decreased(run_of, scenario, variant):
    _assert_loss_decreased(run_of(scenario).get("fused", variant), f"FusedAdamW, {scenario}, {variant}")


# ---- The low-byte options (scenario "low_bytes") ----------------------------------------------

def _skip_without(wrapper: str) -> None:
    """Skips a low-byte test whose wrapper this torch lacks (as run_of does for the scenarios)."""
    if wrapper == "fsdp2":
        try:
            _fully_shard()
        except ImportError:
            pytest.skip(f"this torch ({torch.__version__}) has no FSDP2 fully_shard")
    if wrapper in ("tensor_parallel", "shard_rounding"):
        try:
            _tensor_parallel_api()
        except ImportError as e:
            pytest.skip(f"this torch ({torch.__version__}) lacks the tensor-parallel API: {e}")


@pytest.mark.parametrize("wrapper, option",
                         [(w, o) for w, o in LOW_BYTES_RUNS if w in LOW_BYTES_WRAPPERS + ["zero"]
                          and not (w == "fsdp2" and o in FLOAT_MOMENTS_WHEN_SHARDED)])
def test_low_bytes_sharded_run_is_the_single_process_run(run_of, wrapper, option):
    """Under DDP and FSDP2 (and ZeRO for 8-bit moments), each option leaves the same full parameters on both ranks, bit for
    bit those of the single-process run of the unsharded model: masters and moments sharded
    with their parameters (8-bit codes and scales too, where the shards hold whole blocks:
    make_wide_model()), and stochastic rounding under FSDP2 drawing for each element of a
    shard the bits of its index in the whole parameter (every rank trains on the same batch,
    so the averaged gradients are the single-process ones exactly)."""
    _skip_without(wrapper)
    run = run_of(LOW_BYTES)
    results = run.get(wrapper, option)
    what = f"FusedAdamW({option}), {wrapper}"
    _assert_ranks_bitwise_equal(results, what)
    single = run.get("single", option)[0]["params"]
    differ = [name for name, value in single.items() if not torch.equal(results[0]["params"][name], value)]
    assert not differ, f"{what}: after {STEPS} steps {differ} differ from the single-process run's"
    _assert_loss_decreased(results, what)


@pytest.mark.parametrize("wrapper, option",
                         [(w, o) for w, o in LOW_BYTES_RUNS if w in ["single"] + LOW_BYTES_WRAPPERS])
def test_low_bytes_state_has_the_options_dtypes_and_is_placed_like_the_parameters(run_of, wrapper, option):
    """step == STEPS for every parameter; exp_avg and exp_avg_sq in the option's dtype; the
    master where the option keeps one (float32, or int16 remainders) and none otherwise; each
    of the parameter's tensor type, shape and placements (a DTensor Shard(0) under FSDP2, as
    the parameter: what torch.distributed.checkpoint saves and reshards)."""
    _skip_without(wrapper)
    param_dtype, options = (EIGHT_BIT_SHARDED[option] if option in EIGHT_BIT_SHARDED
                            else LOW_BYTES_OPTIONS[option][::2])
    master = options.get("master_weights")
    moment_dtype = options.get("moment_dtype") or (torch.float32 if master else param_dtype)
    if wrapper == "fsdp2" and option in FLOAT_MOMENTS_WHEN_SHARDED:
        # No shard holds whole blocks (make_model()): float moments, float32 beside float32
        # parameters or a master, bfloat16 for a bfloat16 parameter alone.
        moment_dtype = torch.float32 if param_dtype == torch.float32 or master else param_dtype
    master_dtype = {"float32": torch.float32, "remainder": torch.int16}.get(master)
    for rank, result in enumerate(run_of(LOW_BYTES).get(wrapper, option)):
        assert len(result["state"]) == len(result["params"])
        for name, s in result["state"].items():
            where = f"FusedAdamW({option}), {wrapper}, rank {rank}, {name!r}"
            assert s["step"] == STEPS, where
            if moment_dtype == "8bit":   # uint8 codes laid out like the parameter (and their scales)
                assert not s["moments"] and set(s["codes"]) == {"exp_avg_codes", "exp_avg_sq_codes"}, (where, s["keys"])
                assert set(s["scales"]) == {"exp_avg_absmax", "exp_avg_sq_absmax"}, (where, s["keys"])
                for key, (kind, dtype) in s["codes"].items():
                    assert (kind, dtype) == (s["param"], torch.uint8), (where, key, kind, dtype)
                # The scales: the parameter's shape, its last dimension counted in 256-element
                # blocks where that is whole blocks (flat otherwise), placed as the parameter.
                tensor_type, shape, placements = s["param"]
                blocked = shape[:-1] + (shape[-1] // 256,) if shape[-1] % 256 == 0 else (-(-math.prod(shape) // 256),)
                for key, (kind, dtype) in s["scales"].items():
                    assert (kind, dtype) == ((tensor_type, blocked, placements), torch.float32), (where, key, kind)
            else:
                assert set(s["moments"]) == {"exp_avg", "exp_avg_sq"}, (where, s["keys"])
            for key, (kind, dtype) in s["moments"].items():
                assert (kind, dtype) == (s["param"], moment_dtype), (where, key, kind, dtype)
            if master is None:
                assert s["master"] is None, (where, s["keys"])
            else:
                assert s["master"] == (s["param"], master_dtype), (where, s["master"])
            if wrapper == "fsdp2":
                assert s["param"][0] == "DTensor" and s["param"][2] == ("Shard(0)",), (where, s["param"])


@pytest.mark.parametrize("option", sorted(FLOAT_MOMENTS_WHEN_SHARDED))
def test_eight_bit_shards_without_whole_blocks_keep_float_moments_and_say_so(run_of, option):
    """Under FSDP2, make_model()'s shards hold no whole 256-element blocks of their last
    dimension (16 and 48 wide): each parameter keeps float moments placed as it is (float32
    for float32 parameters, bfloat16 for bfloat16 ones without a master: the state test above),
    FusedAdamW warns once per parameter naming its shape and that dtype, and the run keeps the
    ranks equal and trains."""
    _skip_without("fsdp2")
    results = run_of(LOW_BYTES).get("fsdp2", option)
    what = f"FusedAdamW({option}), fsdp2"
    _assert_ranks_bitwise_equal(results, what)
    _assert_loss_decreased(results, what)
    for rank, result in enumerate(results):
        moments = "float32" if LOW_BYTES_OPTIONS[option][0] == torch.float32 else "bfloat16"
        warned = [w for w in result["warnings"] if f"keeps {moments} moments for a DTensor parameter" in w]
        shapes = [str(s["param"][1]) for s in result["state"].values()]
        unnamed = [shape for shape in shapes if not any(f"shape {shape} " in w for w in warned)]
        assert not unnamed and len(warned) == len(shapes), (rank, unnamed, result["warnings"])


def test_eight_bit_shards_step_as_the_unsharded_parameter_where_they_hold_whole_blocks(run_of):
    """8-bit moments of parameters placed over two ranks (_eight_bit_placements). A shard
    holding whole blocks of the last dimension (4 x 512 placed Shard(0), Shard(1), Replicate,
    or (Replicate, Shard(1)) on a 1 x 2 mesh; 512 placed Shard(0); 1 x 512 Shard(0), whose rank
    1 holds nothing) keeps 8-bit codes and scales sharded as the parameter, steps bit for bit as
    its part of the unsharded parameter, and its gathered codes and scales are the unsharded
    ones. One that would cut a block (4 x 768 Shard(1): 384 of 3 blocks' 768 per rank; 300
    Shard(0); 6 x 48 Shard(0), float32 and bfloat16) keeps float moments placed as the
    parameter (float32, and bfloat16 for the bfloat16 parameter), says so, and steps bit for bit
    as the unsharded parameter with those moments (moment_dtype=None), not as the unsharded 8-bit
    one. Each reloads its own state_dict() between the steps. Full checkpoints (the unsharded
    optimizer's state_dict(), and the same decoded to float moments) load into the sharded
    optimizer as each rank's shards of what the unsharded optimizer holds after the same load
    (the decoded moments exactly, where it keeps float moments); the sharded state_dict()
    converts to torch's format (noam_ext.dequantized_state_dict) shard by shard."""
    _skip_without("shard_rounding")
    results = run_of(LOW_BYTES).get("eight_bit_placements", "8bit")
    whole = {"4x512 Shard(0)": (4, 2), "4x512 Shard(1)": (4, 2), "4x512 Replicate": (4, 2), "512 Shard(0)": (2,),
             "1x512 Shard(0), rank 1 empty": (1, 2), "4x512 (Replicate, Shard(1)) on a 1x2 mesh": (4, 2)}
    for rank, result in enumerate(results):
        assert len(result["placements"]) == 10, sorted(result["placements"])
        for name, case in result["placements"].items():
            where = (rank, name)
            assert case["loaded_differs"] == [], (where, case["loaded_differs"])
            if name in whole:
                assert case["eight_bit"] and not case["float_moments"] and not case["warnings"], where
                assert torch.equal(case["local"], case["unsharded_here"]), where
                assert case["gathered_state_differs"] == [], (where, case["gathered_state_differs"])
                assert case["scales"] == ("DTensor", whole[name], case["param"][2]), (where, case["scales"])
            else:
                dtype = torch.bfloat16 if "bfloat16" in name else torch.float32
                assert not case["eight_bit"], where
                assert case["float_moments"] == {k: (case["param"], dtype) for k in ("exp_avg", "exp_avg_sq")}, where
                assert len(case["warnings"]) == 1, (where, case["warnings"])
                assert f"keeps {str(dtype).removeprefix('torch.')} moments" in case["warnings"][0], where
                assert torch.equal(case["local"], case["float_moments_here"]), where
                assert not torch.equal(case["local"], case["unsharded_here"]), where
    assert results[1]["placements"]["1x512 Shard(0), rank 1 empty"]["local"].numel() == 0


def test_eight_bit_checkpoints_move_between_fsdp2_and_one_process_bit_for_bit(run_of):
    """make_wide_model() with 8-bit moments (amsgrad) trained in one process and under FSDP2
    (_eight_bit_checkpoints): the same parameters; the sharded run's full state dict
    (torch.distributed.checkpoint.state_dict.get_optimizer_state_dict) equals the single run's
    state_dict() key for key, codes and scales of the same shapes; and resuming either one in
    the other (load_state_dict both ways, set_optimizer_state_dict into FSDP2), or from a sharded
    checkpoint saved by torch.distributed.checkpoint (into FSDP2, and resharded into one process),
    continues bit for bit as the single run does. Where a parameter keeps float moments under
    FSDP2 and 8-bit ones in one process (make_model()), set_optimizer_state_dict with a full
    state dict converts both ways: as load_state_dict of it does (float moments quantized), and
    to exactly the decoded moments."""
    _skip_without("fsdp2")
    for rank, result in enumerate(run_of(LOW_BYTES).get("eight_bit_checkpoints", "8bit")):
        assert result["trained"] == [], (rank, result["trained"])
        assert result["full_state_dict"] == [], (rank, result["full_state_dict"])
        assert result["scales"] == {"0.weight": ("DTensor", (512, 1), ("Shard(0)",)),
                                    "0.bias": ("DTensor", (2,), ("Shard(0)",)),
                                    "2.weight": ("DTensor", (5, 2), ("Shard(0)",))}, (rank, result["scales"])
        assert all(differ == [] for differ in result["resumed"].values()), (rank, result["resumed"])
        assert result["float shards -> one process 8-bit"] == [], (rank, result["float shards -> one process 8-bit"])
        assert result["one process 8-bit -> float shards"] == [], (rank, result["one process 8-bit -> float shards"])


def test_low_bytes_tensor_parallel_stochastic_rounding_keeps_replicated_parameters_equal(run_of):
    """Under tensor parallelism, stochastic rounding draws the same bits on every rank for a
    replicated parameter (offset 0 and no salt: noam_ext._storage.shard_rounding), so the
    ranks keep holding the same values; the sharded ones (Shard(0), and Shard(1) with a stream
    per shard) train with the rest."""
    _skip_without("tensor_parallel")
    results = run_of(LOW_BYTES).get("tensor_parallel", "stochastic-rounding")
    what = "FusedAdamW(stochastic-rounding), tensor_parallel"
    placed = {name: s["param"][2] for name, s in results[0]["state"].items()}
    assert placed == TENSOR_PARALLEL_PLACEMENTS, placed
    for name, placements in placed.items():
        if placements == ("Replicate",):
            assert torch.equal(results[0]["state"][name]["local"], results[1]["state"][name]["local"]), (what, name)
    for rank, result in enumerate(results):
        assert all(s["step"] == STEPS for s in result["state"].values()), (what, rank)
    _assert_loss_decreased(results, what)


def test_low_bytes_stochastic_rounding_of_shards_is_as_documented(run_of):
    """noam_ext._storage.shard_rounding, for a 5 x 7 bfloat16 parameter on two ranks: a shard
    that is a run of the whole parameter's elements (Shard(0), Replicate) draws the unsharded
    parameter's bits (its offset is its element 0's index: 21 for rank 1's rows 3-4, no
    salt); a Shard(1) shard draws from a stream of its own (offset 0, a salt from its global
    offsets, different on each rank): the same bits for the same sharding, but not the
    unsharded run's."""
    _skip_without("shard_rounding")
    results = run_of(LOW_BYTES).get("shard_rounding", "stochastic-rounding")
    for rank, result in enumerate(results):
        cases = result["placements"]
        for placement, case in cases.items():
            assert torch.equal(case["local"], case["again"]), (rank, placement)
        for placement, offset in (("Shard(0)", [0, 21][rank]), ("Replicate", 0)):
            case = cases[placement]
            assert (case["offset"], case["salt"]) == (offset, 0), (rank, placement)
            assert torch.equal(case["local"], case["unsharded_here"]), (rank, placement)
        case = cases["Shard(1)"]
        assert case["offset"] == 0 and case["salt"] != 0, rank
        assert not torch.equal(case["local"], case["unsharded_here"]), rank
    assert results[0]["placements"]["Shard(1)"]["salt"] != results[1]["placements"]["Shard(1)"]["salt"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="worker process of tests/distributed/test_distributed.py")
    parser.add_argument("--worker", nargs=3, metavar=("SCENARIO", "RANK", "OUT_DIR"), required=True)
    args = parser.parse_args()
    scenario, rank, out_dir = args.worker
    worker_main(scenario, int(rank), Path(out_dir))

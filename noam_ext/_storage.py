"""FusedAdamW's per-parameter state: its format (torch.optim.AdamW's), and the low-byte
options (docs/adamw.md, "Fewer bytes per parameter"): checking them per parameter, the
state they need, the dtypes of loaded state, and stochastic rounding's streams.

Group options (defaults of the constructor, or keys of a param group):
  master_weights:  None, "float32" (a float32 master per 16-bit parameter, in
                   state["master_param"]) or "remainder" (an int16 remainder per bfloat16
                   parameter, in state["master_remainder"], rebuilding the master exactly)
  moment_dtype:    None (torch's: the parameter's dtype; float32 with master weights),
                   torch.float32, torch.bfloat16, or "8bit": block-wise 8-bit codes with a
                   float32 scale per 256 elements (csrc/noam_ext/quantization.h), kept in
                   state["exp_avg_codes"], state["exp_avg_absmax"] and likewise for
                   exp_avg_sq and max_exp_avg_sq (docs/eight_bit_state.md); the scales are
                   shaped like the parameter in blocks (scales_shape), so that a DTensor's
                   shard as it does; a DTensor whose shards would cut a block keeps float
                   moments (eight_bit_for)
  stochastic_rounding: round what the step stores in bfloat16 stochastically
  seed:            stochastic rounding's seed (drawn from torch's generator when None)

The combinations of dtypes the op runs are listed by the extension itself
(csrc/noam_ext/storage.h, noam_ext._C.supported_storage()); this module does not
repeat the list, it asks."""

from __future__ import annotations

import functools
import math
import warnings
import weakref
from dataclasses import dataclass, replace

import torch

from ._extension import _C
from ._layout import table_layout

MASTER_WEIGHTS = (None, "float32", "remainder")
EIGHT_BIT = "8bit"
MOMENT_DTYPES = (None, torch.float32, torch.bfloat16, EIGHT_BIT)
# Where each master form lives in optimizer.state, and its dtype, as the op reads them
# (csrc/noam_ext/storage.h, kMasterStateKeys).
_MASTER_STATE = table_layout()["master_state"]
MASTER_KEYS = {kind: key for kind, (key, _) in _MASTER_STATE.items()}                       # option -> state key
MASTER_DTYPES = {key: getattr(torch, dtype) for key, dtype in _MASTER_STATE.values()}      # state key -> dtype
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
# 8-bit moments: per moment of MOMENT_KEYS, (its codes' key, its scales' key), as the op reads
# them (csrc/noam_ext/storage.h, kQuantizedStateKeys), and its map; and the elements per scale.
_QUANTIZED_STATE = dict(zip(MOMENT_KEYS, table_layout()["quantized_state"]))
QUANTIZED_KEYS = {key: (codes, scales) for key, (codes, scales, _, _) in _QUANTIZED_STATE.items()}
# Whether each moment's map is the signed one, and the code of 0.0 in it.
QUANTIZED_SIGNED = {key: signed for key, (_, _, signed, _) in _QUANTIZED_STATE.items()}
_ZERO_CODE = {key: zero for key, (_, _, _, zero) in _QUANTIZED_STATE.items()}
QUANTIZED_BLOCK = table_layout()["quantized_block"]
OPTION_KEYS = ("master_weights", "moment_dtype", "stochastic_rounding", "seed")



@dataclass(frozen=True)
class StorageOptions:
    master_weights: str | None = None
    moment_dtype: torch.dtype | str | None = None
    stochastic_rounding: bool = False
    seed: int = 0

    @property
    def is_default(self) -> bool:
        return self.master_weights is None and self.moment_dtype is None and not self.stochastic_rounding

    @property
    def eight_bit(self) -> bool:
        return self.moment_dtype == EIGHT_BIT


def options_of(group: dict) -> StorageOptions:
    return StorageOptions(group.get("master_weights"), group.get("moment_dtype"),
                          bool(group.get("stochastic_rounding", False)), int(group.get("seed") or 0))


def check_options(master_weights, moment_dtype, stochastic_rounding, seed, where: str = "") -> None:
    """The options' own values (before any parameter is looked at)."""
    if master_weights not in MASTER_WEIGHTS:
        raise ValueError(f"Invalid master_weights{where}: {master_weights!r}; use None, 'float32' or 'remainder'")
    if not any(moment_dtype is d or (isinstance(moment_dtype, str) and moment_dtype == d) for d in MOMENT_DTYPES):
        raise ValueError(f"Invalid moment_dtype{where}: {moment_dtype!r}; use None, torch.float32, "
                         f"torch.bfloat16 or {EIGHT_BIT!r}")
    if not isinstance(stochastic_rounding, bool):
        raise ValueError(f"Invalid stochastic_rounding{where}: {stochastic_rounding!r} must be True or False")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"Invalid seed{where}: {seed!r} must be an integer in [0, 2**63) or None")


def draw_seed() -> int:
    """A seed from torch's default generator, so that torch.manual_seed makes runs repeat."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


@functools.lru_cache(maxsize=None)
def _supported() -> frozenset:
    return frozenset(_C.supported_storage())


def _name(dtype: torch.dtype | str) -> str:
    """The op's name of a dtype ("float32", "8bit", as _C.supported_storage() names them)."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


@functools.lru_cache(maxsize=None)
def supported_param_dtypes() -> tuple[torch.dtype, ...]:
    """The parameter dtypes the op updates (its storage list's), and the complex dtypes of
    its real ones (a complex parameter is updated as its real view, as torch does)."""
    real = [getattr(torch, name) for name in sorted({s[0] for s in _supported()})]
    complex_of = {torch.float32: torch.complex64, torch.float64: torch.complex128}
    return tuple(real + [complex_of[d] for d in real if d in complex_of])


def check_param_dtype(p: torch.Tensor, name: str) -> None:
    if p.dtype not in supported_param_dtypes():
        names = ", ".join(_name(d) for d in supported_param_dtypes())
        raise ValueError(f"FusedAdamW: {name} has dtype {p.dtype}; supported: {names}")


def moment_dtype_for(param_dtype: torch.dtype, options: StorageOptions) -> torch.dtype | str:
    if options.moment_dtype is not None:
        return options.moment_dtype
    return torch.float32 if options.master_weights is not None else param_dtype


def float_moment_dtype(p: torch.Tensor, options: StorageOptions) -> torch.dtype:
    """The dtype of p's moments where they are float tensors: its group's moment dtype, and in
    an 8-bit group (a DTensor shard whose blocks cannot follow its sharding) the default one,
    as without moment_dtype (the parameter's dtype, float32 beside a master: the op has no
    float32 moments of a bfloat16 parameter without one)."""
    return moment_dtype_for(p.dtype, replace(options, moment_dtype=None) if options.eight_bit else options)


def check_param(p: torch.Tensor, options: StorageOptions, name: str) -> None:
    """Whether a parameter can be stored as its group's options say; a ValueError naming
    the parameter and the reason otherwise."""
    if options.is_default:
        return
    if p.is_complex() or p.dtype == torch.float64:
        raise ValueError(f"FusedAdamW: {name} is {p.dtype}: master_weights, moment_dtype and "
                         "stochastic_rounding are for float32, bfloat16 and float16 parameters")
    master = options.master_weights
    if master is not None and p.dtype == torch.float32:
        raise ValueError(f"FusedAdamW: master_weights={master!r} is for 16-bit parameters; {name} is float32, "
                         "its own master")
    if master == "remainder" and p.dtype != torch.bfloat16:
        raise ValueError(f"FusedAdamW: master_weights='remainder' needs bfloat16 parameters (a float32 master is a "
                         f"bfloat16 value and a 16-bit remainder); {name} is {p.dtype}: use 'float32'")
    if options.eight_bit:
        if p.device.type not in ("cpu", "cuda"):
            raise ValueError(f"FusedAdamW: {name} is on {p.device}: moment_dtype='8bit' runs on CPUs and CUDA GPUs")
    # The rest is the op's own check (op_checks.h, storage_problem), asked before any step,
    # with gradients of the parameter's dtype.
    problem = _C.storage_problem(_name(p.dtype), _name(p.dtype), _name(moment_dtype_for(p.dtype, options)),
                                 master or "none", options.stochastic_rounding)
    if problem:
        raise ValueError(f"FusedAdamW: {name} (moment_dtype {options.moment_dtype}, master_weights {master!r}, "
                         f"stochastic_rounding {options.stochastic_rounding}) {problem}")


def state_for(p: torch.Tensor, amsgrad: bool, options: StorageOptions) -> dict:
    """Fresh state for one parameter, made lazily at its first step as torch makes it:
    torch's format (state["step"] a float32 scalar on the parameter's device, the moments
    shaped like p, in the options' moment dtype), plus its master, made from the parameter
    as it is. Each entry is an allocation of its own, made with zeros_like as torch makes
    it: it has the parameter's strides where the parameter is dense, is a DTensor sharded
    like a DTensor parameter, and one parameter's state can be saved, copied or freed
    alone. (Moments carved out of one buffer measured no faster on the whole iteration:
    docs/adamw.md, "Memory".)"""
    state = {"step": torch.zeros((), dtype=torch.float32, device=p.device)}
    eight_bit = eight_bit_for(p, options)
    moment = float_moment_dtype(p, options)
    if options.eight_bit and not eight_bit:
        _warn_float_moments(p, moment)
    if eight_bit and local(p) is not p and _walk_order(local(p)) != list(range(p.dim())):
        raise ValueError(f"FusedAdamW: a DTensor parameter of shape {tuple(p.shape)} has a local shard laid out "
                         f"unlike the whole parameter (strides {tuple(local(p).stride())}): its 8-bit blocks would "
                         "not be the whole parameter's")
    for key in MOMENT_KEYS:
        if key != "max_exp_avg_sq" or amsgrad:
            if eight_bit:
                state.update(quantized_zeros(p, key))
            else:
                state[key] = torch.zeros_like(p, dtype=moment, memory_format=torch.preserve_format)
    if options.master_weights is not None:
        state[MASTER_KEYS[options.master_weights]] = master_from_param(p, options.master_weights)
    return state


# ---- 8-bit moments ----------------------------------------------------------------------
# Blocks of 256 run over a parameter's elements in the op's order (_C.walk_order: its memory
# order when it is dense, its shape's order when it has gaps), whatever the state tensors' own
# strides.

@torch.compiler.assume_constant_result
def _op_walk(sizes: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, ...]:
    """(1 if in memory order else 0, then the dimensions outermost first): the op's own rule
    (_C.walk_order); a constant to torch.compile, which creates state while tracing."""
    return tuple(_C.walk_order(list(sizes), list(strides)))


def _codes_format(p: torch.Tensor) -> torch.memory_format:
    """Codes are laid out like a parameter the op walks in its memory order (a dense one), and
    contiguous (its shape's order, the op's walk) for one with gaps: either way their own
    memory order is the op's walk."""
    in_memory_order = _op_walk(tuple(p.shape), tuple(p.stride()))[0]
    return torch.preserve_format if in_memory_order else torch.contiguous_format


def _walk_order(p: torch.Tensor) -> list[int]:
    """p's dimensions in the order the op walks its elements (outermost first)."""
    return list(_op_walk(tuple(p.shape), tuple(p.stride()))[1:])


def _flat_in_walk_order(t: torch.Tensor, order: list[int]) -> torch.Tensor:
    return t.permute(order).reshape(-1)


def _from_walk_order(flat: torch.Tensor, like: torch.Tensor, order: list[int], dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty_like(like, dtype=dtype, memory_format=_codes_format(like))
    out.permute(order).copy_(flat.reshape([like.shape[d] for d in order]))
    return out


def _blocks_in_last_dim(p: torch.Tensor) -> bool:
    """Whether p's blocks tile its last dimension: that dimension is a whole number of blocks
    and the op walks p in its shape's order, so that block j of a row holds elements
    [256 j, 256 j + 256) of that row. For a DTensor, from its global shape and strides, the same
    on every rank (state_for checks that the local shard is laid out alike)."""
    return (p.dim() >= 1 and p.shape[-1] > 0 and p.shape[-1] % QUANTIZED_BLOCK == 0
            and _walk_order(p) == list(range(p.dim())))


def scales_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The shape of one 8-bit moment's scales for parameter p (a DTensor's: its global shape):
    p's shape with its last dimension counted in blocks where the blocks tile that dimension
    (_blocks_in_last_dim), and one flat run of ceil(numel / 256) otherwise. Either way the
    scales in memory order are the blocks in the op's order (what the op reads); the shape is
    what lets a DTensor's scales be sharded as the parameter is, and the full checkpoint of a
    sharded run be the unsharded run's."""
    if _blocks_in_last_dim(p):
        return (*p.shape[:-1], p.shape[-1] // QUANTIZED_BLOCK)
    return (-(-p.numel() // QUANTIZED_BLOCK),)


def blocks_follow_shards(p: torch.Tensor) -> bool:
    """Whether every shard of p holds whole blocks of the unsharded parameter (a plain tensor
    is one shard, and does): the blocks tile p's last dimension, and where the device mesh
    shards that dimension it splits it into equal parts of whole blocks (torch's chunks of
    the dimensions before it are the same for p and its scales, of the same sizes). Each
    shard's scales are then the part of the unsharded scales that its blocks have, its step is
    bit for bit the unsharded step's part (a block's absmax reads only the block), and its
    scales are a DTensor placed as p is (scales_shape). Uneven shards of the last dimension,
    strided shards of it (_StridedShard) and partial placements do not qualify."""
    if local(p) is p:
        return True
    if not _blocks_in_last_dim(p):
        return False
    _, Shard, _, _ = _dtensor_api()
    last, parts = p.dim() - 1, 1
    for size, placement in zip(p.device_mesh.shape, p.placements):
        if placement.is_shard():
            if placement.dim % p.dim() == last:
                if type(placement) is not Shard:
                    return False
                parts *= size
        elif not placement.is_replicate():
            return False
    return (p.shape[-1] // QUANTIZED_BLOCK) % parts == 0


def eight_bit_for(p: torch.Tensor, options: StorageOptions) -> bool:
    """Whether p's moments are kept in 8 bits: in an 8-bit group, every parameter but a DTensor
    whose blocks cannot follow its sharding (blocks_follow_shards), which keeps float moments
    (float_moment_dtype; docs/eight_bit_state.md, "Blocks and shards")."""
    return options.eight_bit and blocks_follow_shards(p)


def _warn_float_moments(p: torch.Tensor, dtype: torch.dtype) -> None:
    warnings.warn(f"FusedAdamW: moment_dtype='8bit' keeps {_name(dtype)} moments for a DTensor parameter of shape "
                  f"{tuple(p.shape)} placed {tuple(p.placements)}: its shards do not hold whole "
                  f"{QUANTIZED_BLOCK}-element blocks of its last dimension (docs/eight_bit_state.md, "
                  "'Blocks and shards')", stacklevel=4)


def _dtensor_api():
    """(DTensor, Shard, Replicate, compute_local_shape_and_global_offset): torch.distributed.tensor,
    or torch 2.4's torch.distributed._tensor."""
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:   # torch 2.4
        from torch.distributed._tensor import DTensor, Replicate, Shard
        from torch.distributed._tensor._utils import compute_local_shape_and_global_offset
    return DTensor, Shard, Replicate, compute_local_shape_and_global_offset


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(int(size), 1)
    return tuple(reversed(strides))


def _as_shards_of(p: torch.Tensor, local_value: torch.Tensor, shape) -> torch.Tensor:
    """local_value as this rank's shard of a DTensor of `shape` placed as p is."""
    DTensor, _, _, _ = _dtensor_api()
    return DTensor.from_local(local_value, p.device_mesh, p.placements, run_check=False,
                              shape=torch.Size(shape), stride=_contiguous_strides(shape))


def splits_full_tensors(p: torch.Tensor) -> bool:
    """Whether a full (unsharded) state tensor can be cut into p's shards here, without a
    collective: p is a plain tensor, or a DTensor placed only Shard and Replicate (not a strided
    shard)."""
    if local(p) is p:
        return True
    _, Shard, Replicate, _ = _dtensor_api()
    return all(type(placement) in (Shard, Replicate) for placement in p.placements)


def shard_of(p: torch.Tensor, value: torch.Tensor, shape=None) -> torch.Tensor:
    """A state tensor of a DTensor p (its moment or codes; or, given their shape, its scales) as
    a DTensor placed as p is (check_loadable made sure that a full one can be cut:
    splits_full_tensors)."""
    shape = p.shape if shape is None else torch.Size(shape)
    return _as_shards_of(p, _local_part(p, value, shape).contiguous(), shape)


def _local_part(p: torch.Tensor, value: torch.Tensor, shape=None) -> torch.Tensor:
    """This rank's part of `value` (p's moment or codes; or, given their shape, its scales) for
    a DTensor p: the local shard of a DTensor placed as p is (redistributed there first if it
    is placed otherwise), or the slice of a full tensor that p's shard covers (Shard and
    Replicate placements)."""
    if local(value) is not value:
        if tuple(value.placements) != tuple(p.placements):
            value = value.redistribute(p.device_mesh, p.placements)
        return value.to_local()
    if not splits_full_tensors(p):
        raise ValueError(f"FusedAdamW: a full (not sharded) state tensor for a DTensor parameter placed "
                         f"{tuple(p.placements)} cannot be cut into its shards here; load a sharded checkpoint "
                         "(torch.distributed.checkpoint) instead")
    _, _, _, compute_local_shape_and_global_offset = _dtensor_api()
    sizes, offset = compute_local_shape_and_global_offset(p.shape if shape is None else torch.Size(shape),
                                                          p.device_mesh, p.placements)
    return value.to(local(p).device)[tuple(slice(o, o + s) for o, s in zip(offset, sizes))]


def _zero_scales(p: torch.Tensor) -> torch.Tensor:
    shape = scales_shape(p)
    if local(p) is p:
        return torch.zeros(shape, dtype=torch.float32, device=p.device)
    shard = local(p)   # whole blocks of the last dimension (blocks_follow_shards)
    return _as_shards_of(p, torch.zeros(scales_shape(shard), dtype=torch.float32, device=shard.device), shape)


def quantized_zeros(p: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
    """A zero moment in 8 bits: every code the map's zero, every scale 0 (a DTensor placed as
    p is, each, for a DTensor p)."""
    codes_key, scales_key = QUANTIZED_KEYS[key]
    codes = torch.full_like(p, _ZERO_CODE[key], dtype=torch.uint8, memory_format=_codes_format(local(p)))
    return {codes_key: codes, scales_key: _zero_scales(p)}


def quantize_moment(p: torch.Tensor, key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """A moment (a tensor of p's shape) as the op stores it in 8 bits: its codes (laid out like
    p) and scales, made by the op's own encoder (csrc/noam_ext/quantization.h; one rounding).
    For a DTensor p, each rank quantizes its own shard (whole blocks: blocks_follow_shards)."""
    codes_key, scales_key = QUANTIZED_KEYS[key]
    if local(p) is not p:
        shard = local(p)
        part = quantize_moment(shard, key, _local_part(p, value))
        return {codes_key: _as_shards_of(p, part[codes_key], p.shape),
                scales_key: _as_shards_of(p, part[scales_key], scales_shape(p))}
    order = _walk_order(p)
    flat = _flat_in_walk_order(value.detach().to(device="cpu", dtype=torch.float32), order).contiguous()
    codes, scales = _C.quantize_blocks(flat, QUANTIZED_SIGNED[key])
    return {codes_key: _from_walk_order(codes, p, order, torch.uint8).to(p.device),
            scales_key: scales.reshape(scales_shape(p)).to(p.device)}


def dequantize_moment(p: torch.Tensor, key: str, entry: dict) -> torch.Tensor:
    """The float32 moment (laid out like p) that 8-bit codes and scales decode to: exactly the
    values the op's next step decodes. For a DTensor p, each rank decodes its own shard."""
    codes_key, scales_key = QUANTIZED_KEYS[key]
    if local(p) is not p:
        codes, scales = entry[codes_key], entry[scales_key]
        if local(codes) is codes or not blocks_follow_shards(p):
            # Full codes (a full checkpoint's, or gathered: p's shards would cut blocks): decode
            # them whole and keep this rank's part.
            codes = codes if local(codes) is codes else codes.full_tensor()
            scales = scales if local(scales) is scales else scales.full_tensor()
            return shard_of(p, dequantize_moment(codes, key, {codes_key: codes, scales_key: scales}))
        part = dequantize_moment(local(p), key, {codes_key: _local_part(p, codes),
                                                 scales_key: _local_part(p, scales, scales_shape(p))})
        return _as_shards_of(p, part, p.shape)
    order = _walk_order(p)
    codes = _flat_in_walk_order(entry[codes_key].detach().cpu(), order).contiguous()
    scales = entry[scales_key].detach().cpu().float().reshape(-1).contiguous()
    flat = _C.dequantize_blocks(codes, scales, QUANTIZED_SIGNED[key])
    return _from_walk_order(flat, p.detach().cpu(), order, torch.float32).to(p.device)


def step_on_device(value, device: torch.device) -> torch.Tensor:
    """state["step"] as the op reads it: a float32 scalar on the parameter's device
    (torch.optim.AdamW checkpoints keep it on the CPU, older ones as a float)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=torch.float32).reshape(())
    return torch.tensor(float(value), dtype=torch.float32, device=device)


def local(p: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor parameter (what the op updates), else p."""
    return getattr(p, "_local_tensor", p)


def master_from_param(p: torch.Tensor, kind: str) -> torch.Tensor:
    """The master of a parameter that has none yet: its value in float32, or a zero
    remainder (the bfloat16 value itself is then the master, exactly)."""
    with torch.no_grad():
        if kind == "float32":
            return torch.empty_like(p, dtype=torch.float32, memory_format=torch.preserve_format).copy_(p)
        return torch.zeros_like(p, dtype=torch.int16, memory_format=torch.preserve_format)


def remainder_of(master: torch.Tensor) -> torch.Tensor:
    """The int16 remainder of a float32 master, as the op splits it (the op's own code,
    on the CPU: a checkpoint conversion, not a step)."""
    return _C.remainders_of_masters(master.detach().cpu()).to(master.device)


def master_of(param: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    """The float32 master a bfloat16 parameter and its remainder make (as remainder_of)."""
    return _C.masters_of_remainders(param.detach().cpu(), remainder.cpu()).to(param.device)


def loaded_dtype(p: torch.Tensor, key: str, options: StorageOptions) -> torch.dtype | None:
    """The dtype a loaded state entry must have for this optimizer, where it is not the
    parameter's (torch.optim.Optimizer.load_state_dict casts every floating entry to the
    parameter's dtype, which would round float32 moments or masters of a bfloat16
    parameter, and turn remainders into floats): None where the parameter's dtype is right."""
    if key in MOMENT_KEYS and options.eight_bit:
        return torch.float32   # quantized from float32 (settle_moments), not from a rounded copy
    if key in MOMENT_KEYS and not options.is_default and not p.is_complex():
        moment = moment_dtype_for(p.dtype, options)
        return moment if moment != p.dtype else None
    return _QUANTIZED_DTYPES.get(key) or MASTER_DTYPES.get(key)


# 8-bit moments' entries keep their dtypes: uint8 codes, float32 scales.
_QUANTIZED_DTYPES = {name: dtype for codes, scales in QUANTIZED_KEYS.values()
                     for name, dtype in ((codes, torch.uint8), (scales, torch.float32))}


# ---- stochastic rounding's streams ----------------------------------------------------

@torch.compiler.assume_constant_result
def rounding_stream(seed: int, group: int, index: int, salt: int = 0) -> int:
    """Parameter `index` of param group `group`: the stream of its rounding bits as the op's
    int64 argument carries it (the op's own computation, csrc/noam_ext/rounding_streams.h;
    the same on every rank of a sharded run). A constant to torch.compile, which calls it
    while tracing (it cannot trace into C++)."""
    return _C.rounding_stream(seed, group, index, salt)


# Cached per parameter, by id (a WeakKeyDictionary would compare tensors with ==, which
# is elementwise for tensors): (a weak reference to the parameter, (offset, salt)); the
# entry goes with the parameter.
_SHARDS: dict[int, tuple[weakref.ref, tuple[int, int]]] = {}


def shard_rounding(p: torch.Tensor) -> tuple[int, int]:
    """(offset, salt) of a DTensor parameter's local shard for stochastic rounding: its
    element 0's index within the whole parameter, where the shard is a run of the whole
    parameter's elements in order (sharded along dimension 0 only, as FSDP2 shards, or
    replicated), with salt 0, so that every element gets the bits the unsharded parameter
    gets; otherwise (Shard(1), ...) offset 0 and a salt from the shard's global offsets,
    which gives the shard a stream of its own (the bits are then the same for the same
    sharding, but not those of the unsharded run). Cached per parameter."""
    key = id(p)
    entry = _SHARDS.get(key)
    if entry is not None and entry[0]() is p:
        return entry[1]
    value = _shard_rounding(p)
    _SHARDS[key] = (weakref.ref(p, lambda _, key=key: _SHARDS.pop(key, None)), value)
    return value


def _shard_rounding(p: torch.Tensor) -> tuple[int, int]:
    DTensor, _, _, compute_local_shape_and_global_offset = _dtensor_api()
    if not isinstance(p, DTensor):
        return 0, 0
    local_shape, global_offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if p.dim() == 0 or (all(o == 0 for o in global_offset[1:]) and tuple(local_shape[1:]) == tuple(p.shape[1:])):
        return (int(global_offset[0]) * math.prod(p.shape[1:]) if p.dim() else 0), 0
    return 0, _C.shard_salt([int(offset) for offset in global_offset])

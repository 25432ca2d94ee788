"""Loading checkpoints into FusedAdamW (FusedAdamW.load_state_dict): the checks torch
makes and those it leaves to the next step, made before anything changes; the state
entries kept in another dtype than the parameter's (which torch would cast); and the
conversion between master forms, so that a checkpoint of torch.optim.AdamW or of any
FusedAdamW option loads into any other (docs/adamw.md, "Fewer bytes per parameter")."""

from __future__ import annotations

from typing import Any

import torch

import math

from ._extension import _C
from ._storage import (MASTER_DTYPES, MASTER_KEYS, MOMENT_KEYS, QUANTIZED_BLOCK, QUANTIZED_KEYS, QUANTIZED_SIGNED,
                       dequantize_moment, eight_bit_for, float_moment_dtype,
                       loaded_dtype, local, master_of, options_of, quantize_moment, remainder_of, scales_shape,
                       shard_of, splits_full_tensors)


def set_aside_own_dtypes(param_groups: list[dict], group_options: list[dict], state_dict: dict[str, Any]):
    """A copy of state_dict without the state entries that the groups' storage options
    keep in another dtype than the parameter's, and those entries as (param, key,
    value, dtype)."""
    kept, state = [], dict(state_dict["state"])
    for group, own, saved in zip(param_groups, group_options, state_dict["param_groups"]):
        options = options_of(own)
        for p, saved_key in zip(group["params"], saved["params"]):
            entry = state.get(saved_key)
            if not isinstance(entry, dict):
                continue
            entry = dict(entry)
            for key in list(entry):
                dtype = loaded_dtype(p, key, options)
                if dtype is not None and isinstance(entry[key], torch.Tensor):
                    kept.append((p, key, entry.pop(key), dtype))
            state[saved_key] = entry
    return {**state_dict, "state": state}, kept


@torch.no_grad()
def convert_masters(param_groups: list[dict], state: dict) -> None:
    """After a load, each parameter's state holds the master form its group asks for and no
    other (master_weights switched between "float32" and "remainder", or none)."""
    for group in param_groups:
        for p in group["params"]:
            entry = state.get(p)
            if entry:
                settle_master(p, entry, group.get("master_weights"))


def settle_master(p: torch.Tensor, entry: dict, kind: str | None) -> None:
    """Leaves a state entry with at most the master form `kind` asks for. The other form is
    converted, exactly, where it can be (a local bfloat16 parameter; otherwise the master is
    made anew from the parameter at its next step), and dropped: a stale master left in the
    state would be saved, and a later load into an optimizer of that form would bring back
    old weights."""
    own = MASTER_KEYS.get(kind)
    others = [key for key in MASTER_KEYS.values() if key != own and key in entry]
    if own is not None and own not in entry and others and local(p) is p and p.dtype == torch.bfloat16:
        if own == "master_remainder":
            entry[own] = remainder_of(entry["master_param"])
        else:
            entry[own] = master_of(p.detach(), entry["master_remainder"])
    for key in others:
        del entry[key]


# ---- 8-bit moments -----------------------------------------------------------------------

def _moment_form(entry: dict, key: str) -> str | None:
    """How a state entry holds a moment: "8bit" (its codes and scales), "float" (torch's key), or None."""
    codes, scales = QUANTIZED_KEYS[key]
    if codes in entry and scales in entry:
        return "8bit"
    return "float" if key in entry else None


@torch.no_grad()
def settle_moments(param_groups: list[dict], state: dict) -> None:
    """After a load, each parameter's moments are in the form its group asks for, and only
    that form: 8-bit codes and scales in a moment_dtype="8bit" group (a float checkpoint's
    quantized by the op's encoder, one rounding; scales of another shape but as many, such as
    a bitsandbytes checkpoint's or an older one's flat run, reshaped to scales_shape), float
    tensors in any other (8-bit ones decoded, exactly, then cast to the group's moment dtype)
    and for a DTensor shard that keeps float32 moments in an 8-bit group (eight_bit_for).

    An entry holding a moment in both forms was merged from a checkpoint into this optimizer's
    own state (the optimizer never keeps both): torch.distributed.checkpoint's
    set_optimizer_state_dict(full_state_dict=True) fills the optimizer's state with the
    checkpoint's values and adds the checkpoint's other keys. The form this optimizer does not
    keep is then the checkpoint's, and it is the one converted (a parameter that is 8-bit here
    but kept float moments where it was saved, sharded otherwise, and the reverse)."""
    for group in param_groups:
        options = options_of(group)
        for p in group["params"]:
            entry = state.get(p)
            if not entry:
                continue
            eight_bit = eight_bit_for(p, options)
            sharded = local(p) is not p
            for key in MOMENT_KEYS:
                codes, scales = QUANTIZED_KEYS[key]
                has_float, has_codes = key in entry, codes in entry and scales in entry
                if eight_bit:
                    if has_float:
                        entry.update(quantize_moment(p, key, entry[key]))
                    entry.pop(key, None)
                    if scales in entry and local(entry[scales]) is entry[scales]:
                        entry[scales] = entry[scales].reshape(scales_shape(p))
                    if sharded:   # a full checkpoint's codes or scales: this rank's shards of them
                        for name, shape in ((codes, None), (scales, scales_shape(p))):
                            if name in entry and local(entry[name]) is entry[name]:
                                entry[name] = shard_of(p, entry[name], shape)
                else:
                    if has_codes:
                        entry[key] = dequantize_moment(p, key, entry)
                    if key in entry:
                        if sharded and local(entry[key]) is entry[key]:   # a full checkpoint's moment
                            entry[key] = shard_of(p, entry[key])
                        if options.eight_bit or has_codes:   # decoded, or a shard keeping float moments
                            entry[key] = entry[key].to(float_moment_dtype(p, options))
                    entry.pop(codes, None)
                    entry.pop(scales, None)


def dequantized_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of a FusedAdamW state_dict() in torch.optim.AdamW's format: 8-bit moments
    decoded to float32 exp_avg, exp_avg_sq and max_exp_avg_sq (exactly the values the next
    step would decode). torch.optim.AdamW.load_state_dict then casts them to each parameter's
    dtype, as it casts any checkpoint. Entries without 8-bit moments are copied as they are."""
    state = {}
    for key, entry in state_dict["state"].items():
        entry = dict(entry)
        for moment in MOMENT_KEYS:
            if _moment_form(entry, moment) == "8bit":
                codes = entry[QUANTIZED_KEYS[moment][0]]
                entry[moment] = dequantize_moment(codes, moment, entry)
                for name in QUANTIZED_KEYS[moment]:
                    del entry[name]
        state[key] = entry
    groups = [{k: v for k, v in g.items() if k != "moment_dtype"} for g in state_dict["param_groups"]]
    return {**state_dict, "state": state, "param_groups": groups}


# bitsandbytes' Optimizer2State keeps, per parameter: state1/state2 (uint8 codes of qmap1/qmap2
# with one float32 absmax per block in absmax1/absmax2; float32 moments for tensors under its
# min_8bit_size) and "step" as an int (bitsandbytes/optim/optimizer.py).
_BNB_KEYS = ("state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2")
_BNB_NON_BLOCKWISE = ("max1", "max2", "new_max1", "new_max2")   # its block_wise=False form


def from_bitsandbytes(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of state_dict with each bitsandbytes 2-state entry (AdamW8bit, Adam8bit; see
    _BNB_KEYS) in FusedAdamW's 8-bit format. Where the checkpoint's maps are bitsandbytes'
    dynamic maps (this library's within 2 ulps: csrc/noam_ext/quantization.h) and its block a
    multiple of 256 (bitsandbytes' 256, or 2048 in older releases; inferred from absmax's
    length), codes are copied and each absmax repeated over the 256-element blocks it covers:
    every moment then decodes to bitsandbytes' value within 2 ulps (1.8e-7 relative).
    Otherwise (other maps or blocks, float32 state of small tensors) the moments are decoded
    with the checkpoint's own map and kept as float moments, for the load to quantize with
    this library's encoder (one rounding)."""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict):
        return state_dict   # not a state dict: check_loadable says so
    state = {}
    for key, entry in state_dict["state"].items():
        state[key] = _from_bnb_entry(key, entry) if isinstance(entry, dict) and "state1" in entry else entry
    return {**state_dict, "state": state}


MAP_TOLERANCE = 4e-7   # relative: bitsandbytes' float32 maps differ from ours by at most 1.8e-7


def _from_bnb_entry(key, entry: dict) -> dict:
    out = {k: v for k, v in entry.items() if k not in _BNB_KEYS + _BNB_NON_BLOCKWISE}
    for index, moment in ((1, "exp_avg"), (2, "exp_avg_sq")):
        values = entry[f"state{index}"]
        if not isinstance(values, torch.Tensor):
            raise ValueError(f"loaded state dict: bitsandbytes' 'state{index}' of the parameter saved as {key!r} is "
                             f"a {type(values).__name__}, not a tensor")
        if values.dtype != torch.uint8:   # a small tensor's float32 moment
            out[moment] = values.float()
            continue
        n = values.numel()
        # block-wise: one absmax per block; otherwise one max for the whole tensor
        absmax = entry.get(f"absmax{index}", entry.get(f"max{index}"))
        if not isinstance(absmax, torch.Tensor) or not isinstance(entry.get(f"qmap{index}"), torch.Tensor):
            raise ValueError(f"loaded state dict: bitsandbytes' 8-bit 'state{index}' of the parameter saved as {key!r} "
                             f"has no 'qmap{index}' and 'absmax{index}' (or 'max{index}') tensors")
        qmap = entry[f"qmap{index}"].detach().cpu().float()
        absmax = absmax.detach().cpu().float().reshape(-1)
        sizes = (256, 2048, 4096, 1024, 512, 128, 64) if f"absmax{index}" in entry else (max(n, 1),)
        block = next((b for b in sizes if math.ceil(n / b) == absmax.numel()), None)
        if block is None:
            raise ValueError(f"loaded state dict: bitsandbytes' state of the parameter saved as {key!r} has "
                             f"{absmax.numel()} absmax values for {n} codes, which match no block size")
        ours = _C.quantization_map(QUANTIZED_SIGNED[moment])
        same_map = qmap.shape == ours.shape and bool(
            ((qmap.double() - ours.double()).abs() <= MAP_TOLERANCE * ours.double().abs()).all())
        if same_map and block % QUANTIZED_BLOCK == 0:
            codes_key, scales_key = QUANTIZED_KEYS[moment]
            out[codes_key] = values.clone()
            out[scales_key] = absmax.repeat_interleave(block // QUANTIZED_BLOCK)[:math.ceil(n / QUANTIZED_BLOCK)]
        else:
            flat = qmap[values.reshape(-1).long().cpu()] * absmax.repeat_interleave(block)[:n]
            out[moment] = flat.reshape(values.shape)
    return out


def check_loadable(param_groups: list[dict], state_dict: dict[str, Any]) -> None:
    """The checks torch.optim.Optimizer.load_state_dict makes (with its messages), and
    those it leaves to the next step (a missing or misshapen moment), made before
    anything is replaced and naming the parameter."""
    saved_groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    saved_state = state_dict.get("state") if isinstance(state_dict, dict) else None
    if not isinstance(saved_groups, list) or not isinstance(saved_state, dict):
        raise ValueError("loaded state dict must have 'state' (a dict) and 'param_groups' (a list)")
    if len(saved_groups) != len(param_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    for g, (group, saved) in enumerate(zip(param_groups, saved_groups)):
        if len(group["params"]) != len(saved["params"]):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                             "optimizer's group")
        for j, (p, key) in enumerate(zip(group["params"], saved["params"])):
            state = saved_state.get(key)
            if not state:
                continue
            name = f"parameter {j} of param group {g} (shape {tuple(p.shape)})"
            if "step" not in state:
                raise ValueError(f"loaded state dict: the state of {name} has no 'step'")
            # Required: exp_avg and exp_avg_sq, and max_exp_avg_sq with amsgrad; checked: every
            # moment present (settle_moments converts whatever is there).
            required = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if saved.get("amsgrad") else [])
            _check_sharding(state, p, name)
            for entry in MOMENT_KEYS:
                form = _moment_form(state, entry)
                if form is None:
                    if entry in required:
                        raise ValueError(f"loaded state dict: the state of {name} has no '{entry}'")
                    continue
                if form == "8bit":
                    _check_quantized(state, entry, p, name)
                if entry not in state:   # both forms (a merge: settle_moments) are both checked
                    continue
                value = state[entry]
                if not isinstance(value, torch.Tensor) or value.shape != p.shape:
                    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ValueError(f"loaded state dict: '{entry}' of {name} has shape {shape}")
            # A master is loaded in its own dtype (not cast to the parameter's): one of another
            # dtype (the other form's, or a 16-bit copy) or shape is no master of this parameter.
            for entry, dtype in MASTER_DTYPES.items():
                value = state.get(entry)
                if value is not None and (not isinstance(value, torch.Tensor) or value.dtype != dtype
                                          or value.shape != p.shape):
                    found = (f"a {value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                             else f"a {type(value).__name__}")
                    raise ValueError(f"loaded state dict: '{entry}' of {name} is {found}; it must be a {dtype} "
                                     "tensor of the parameter's shape")


_SHARDED_KEYS = tuple(MOMENT_KEYS) + tuple(k for pair in QUANTIZED_KEYS.values() for k in pair)


def _check_sharding(state: dict, p: torch.Tensor, name: str) -> None:
    """Moments, codes and scales that the load can place as the parameter is: a DTensor
    parameter takes DTensors, or full tensors that it cuts into its shards where its placements
    allow that without a collective (settle_moments); a plain parameter takes no DTensor."""
    for key in _SHARDED_KEYS:
        value = state.get(key)
        if not isinstance(value, torch.Tensor):
            continue
        if local(p) is p and local(value) is not value:
            raise ValueError(f"loaded state dict: '{key}' of {name} is a DTensor, but the parameter is not")
        if local(p) is not p and local(value) is not value and value.device_mesh != p.device_mesh:
            raise ValueError(f"loaded state dict: '{key}' of {name} is a DTensor on another device mesh than the "
                             "parameter's")
        if local(p) is not p and local(value) is value and not splits_full_tensors(p):
            raise ValueError(f"loaded state dict: '{key}' of {name} is a full tensor, which cannot be cut into the "
                             f"shards of a DTensor placed {tuple(p.placements)} here; load a sharded checkpoint "
                             "(torch.distributed.checkpoint) instead")


def _check_quantized(state: dict, moment: str, p: torch.Tensor, name: str) -> None:
    codes_key, scales_key = QUANTIZED_KEYS[moment]
    codes, scales = state[codes_key], state[scales_key]
    blocks = math.ceil(p.numel() / QUANTIZED_BLOCK)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or codes.shape != p.shape:
        found = f"{codes.dtype} of shape {tuple(codes.shape)}" if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise ValueError(f"loaded state dict: '{codes_key}' of {name} is {found}; it must be uint8 codes of the "
                         "parameter's shape")
    # Any shape with one scale per block: scales_shape's, or a flat run (older checkpoints,
    # bitsandbytes'); the load reshapes them (settle_moments). A DTensor's are sharded as its
    # parameter only in scales_shape's shape.
    if (not isinstance(scales, torch.Tensor) or not scales.is_floating_point() or scales.numel() != blocks
            or (local(scales) is not scales and tuple(scales.shape) != scales_shape(p))):
        found = f"{scales.dtype} of shape {tuple(scales.shape)}" if isinstance(scales, torch.Tensor) else type(scales).__name__
        if isinstance(scales, torch.Tensor) and local(scales) is not scales:
            raise ValueError(f"loaded state dict: '{scales_key}' of {name} is a DTensor of shape "
                             f"{tuple(scales.shape)}; a DTensor parameter's scales are sharded as it is only in "
                             f"the shape {scales_shape(p)} (flat scales of an older checkpoint load as a full "
                             "state dict through optimizer.load_state_dict)")
        raise ValueError(f"loaded state dict: '{scales_key}' of {name} is {found}; it must be {blocks} float32 "
                         f"scales (one per {QUANTIZED_BLOCK} elements, of shape {scales_shape(p)} or flat)")

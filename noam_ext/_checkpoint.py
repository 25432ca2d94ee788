"""Loading checkpoints into FusedAdamW (FusedAdamW.load_state_dict): the checks torch
makes and those it leaves to the next step, made before anything changes; the state
entries kept in another dtype than the parameter's (which torch would cast); and the
conversion between master forms, so that a checkpoint of torch.optim.AdamW or of any
FusedAdamW option loads into any other (docs/adamw.md, "Fewer bytes per parameter")."""

from __future__ import annotations

from typing import Any

import torch

from ._storage import MASTER_DTYPES, MASTER_KEYS, loaded_dtype, local, master_of, options_of, remainder_of


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
            needed = ["step", "exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if saved.get("amsgrad") else [])
            for entry in needed:
                if entry not in state:
                    raise ValueError(f"loaded state dict: the state of {name} has no '{entry}'")
            for entry in needed[1:]:
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

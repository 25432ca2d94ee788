"""Checkpoints across the storage options: a loaded state holds exactly the options this
optimizer was built with, and nothing stale that a later save and load could bring back.

- A checkpoint's options do not turn on here: its master_weights, moment_dtype and
  stochastic_rounding stay behind; only the seed of a stochastically rounding group is
  taken, so that a resumed run draws the same bits.
- One master form per state: switching between "float32" and "remainder" converts the
  master exactly and drops the other form, and a group without master weights keeps none.
- A torch.optim.AdamW checkpoint whose steps need moving still loads into a master-weight
  optimizer (each preparation pass may reveal the next thing to prepare).

Everything is compared bit for bit: the same options on the same bits give the same bits."""

from __future__ import annotations

import copy

import pytest
import torch

from noam_ext import FusedAdamW

KW = dict(lr=1e-3, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.01)


def bf16_params(seed=0, n=3):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 4, generator=generator).to(torch.bfloat16)) for _ in range(n)]


def grads_for(params, step):
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=generator).to(p.dtype) for p in params]


def train(opt, params, steps, first=0):
    for k in range(first, first + steps):
        for p, g in zip(params, grads_for(params, k)):
            p.grad = g
        opt.step()


def master_keys(opt):
    return [{k for k in state if k.startswith("master_")} for state in opt.state.values()]


def test_a_checkpoint_s_options_do_not_turn_on_in_an_optimizer_built_without_them():
    params = bf16_params()
    saved = FusedAdamW(params, master_weights="float32", stochastic_rounding=True,
                       moment_dtype=torch.bfloat16, seed=7, **KW)
    train(saved, params, 3)
    plain_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    plain = FusedAdamW(plain_params, **KW)
    plain.load_state_dict(copy.deepcopy(saved.state_dict()))
    group = plain.param_groups[0]
    assert not {"master_weights", "moment_dtype", "stochastic_rounding", "seed"} & set(group)
    assert master_keys(plain) == [set()] * len(params)
    # and it steps as a plain bfloat16 optimizer: moments in the parameter's dtype
    train(plain, plain_params, 1, first=3)
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in plain.state.values())


def test_the_seed_of_a_stochastically_rounding_checkpoint_is_taken():
    params = bf16_params()
    saved = FusedAdamW(params, stochastic_rounding=True, seed=7, **KW)
    train(saved, params, 2)
    other = FusedAdamW([torch.nn.Parameter(p.detach().clone()) for p in params], stochastic_rounding=True,
                       seed=8, **KW)
    other.load_state_dict(copy.deepcopy(saved.state_dict()))
    assert other.param_groups[0]["seed"] == 7 and other.param_groups[0]["stochastic_rounding"] is True


@pytest.mark.parametrize("first, second", [("float32", "remainder"), ("remainder", "float32")])
def test_switching_the_master_form_converts_it_and_leaves_no_stale_master(first, second):
    params = bf16_params()
    reference_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    reference = FusedAdamW(reference_params, master_weights=first, **KW)
    train(reference, reference_params, 6)

    # first form for 2 steps, the second for 2, the first again for 2: the same bits as
    # the first form all along (both forms hold the same master exactly)
    opt = FusedAdamW(params, master_weights=first, **KW)
    train(opt, params, 2)
    switched = FusedAdamW(params, master_weights=second, **KW)
    switched.load_state_dict(copy.deepcopy(opt.state_dict()))
    other_key = {"float32": "master_param", "remainder": "master_remainder"}
    assert master_keys(switched) == [{other_key[second]}] * len(params)
    train(switched, params, 2, first=2)
    back = FusedAdamW(params, master_weights=first, **KW)
    back.load_state_dict(copy.deepcopy(switched.state_dict()))
    assert master_keys(back) == [{other_key[first]}] * len(params)
    train(back, params, 2, first=4)
    for a, b in zip(params, reference_params):
        assert torch.equal(a, b)
    for p, q in zip(params, reference_params):
        for key, value in reference.state[q].items():
            assert torch.equal(back.state[p][key], value), key


def test_a_master_form_switched_by_hand_between_steps_is_converted_not_made_anew():
    params = bf16_params()
    reference_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    reference = FusedAdamW(reference_params, master_weights="float32", **KW)
    train(reference, reference_params, 4)
    opt = FusedAdamW(params, master_weights="float32", **KW)
    train(opt, params, 2)
    opt.param_groups[0]["master_weights"] = "remainder"
    train(opt, params, 2, first=2)
    assert master_keys(opt) == [{"master_remainder"}] * len(params)
    for a, b in zip(params, reference_params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("master_weights", ["float32", "remainder"])
def test_a_torch_checkpoint_with_steps_to_move_loads_into_a_master_weight_optimizer(master_weights):
    # Steps that are not float32 scalars on the parameter's device are moved at the first
    # step (as a CUDA optimizer moves torch's CPU steps), then the masters are made, then
    # the schedule counter: one preparation pass each.
    params = bf16_params()
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    torch_opt = torch.optim.AdamW(torch_params, foreach=False, **KW)
    train(torch_opt, torch_params, 2)
    state_dict = copy.deepcopy(torch_opt.state_dict())
    for entry in state_dict["state"].values():
        entry["step"] = entry["step"].double()
    opt = FusedAdamW([torch.nn.Parameter(p.detach().clone()) for p in torch_params],
                     master_weights=master_weights, **KW)
    opt.load_state_dict(state_dict)
    params_now = opt.param_groups[0]["params"]
    train(opt, params_now, 1, first=2)
    assert all(float(s["step"]) == 3.0 and s["step"].dtype == torch.float32 for s in opt.state.values())
    assert master_keys(opt) == [{"master_param" if master_weights == "float32" else "master_remainder"}] * 3

"""noam_ext.param_groups: no decay for biases, normalisation parameters and 1-D
parameters, decided by module type and shape rather than by name."""

import warnings

import pytest
import torch
from torch import nn

from noam_ext import param_groups


def ids(params):
    return {id(p) for p in params}


def test_torch_transformer_norms_and_biases_get_no_decay():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = nn.Transformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32)
    decay, no_decay = param_groups(model, weight_decay=0.05)
    named = dict(model.named_parameters())
    # The course rule ['bias', 'LayerNorm.weight'] misses these: they are named norm1.weight etc.
    norm_weights = [n for n in named if ".norm" in n and n.endswith("weight")]
    assert norm_weights, "nn.Transformer should have LayerNorms named normN"
    for name, p in named.items():
        expected_no_decay = name.endswith("bias") or ".norm" in name or p.dim() < 2
        assert (id(p) in ids(no_decay["params"])) == expected_no_decay, name
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(named)


class HFStyleBlock(nn.Module):
    """Norms named "LayerNorm" (BERT style) and a custom norm subclass."""

    class MyNorm(nn.LayerNorm):
        pass

    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(8, 8)
        self.LayerNorm = nn.LayerNorm(8)
        self.custom = HFStyleBlock.MyNorm(8)
        self.rms = nn.RMSNorm(8)
        self.bn = nn.BatchNorm1d(8)
        self.gn = nn.GroupNorm(2, 8)
        self.embed = nn.Embedding(10, 8)
        self.scale = nn.Parameter(torch.ones(8))


def test_named_layernorm_subclasses_and_other_norms():
    model = HFStyleBlock()
    decay, no_decay = param_groups(model)
    assert ids(decay["params"]) == {id(model.dense.weight), id(model.embed.weight)}
    assert id(model.LayerNorm.weight) in ids(no_decay["params"])
    assert id(model.custom.weight) in ids(no_decay["params"])
    assert id(model.scale) in ids(no_decay["params"])


def test_one_dimensional_rule_can_be_turned_off_and_extra_options_copied():
    model = HFStyleBlock()
    decay, no_decay = param_groups(model, weight_decay=0.1, no_decay_1d=False, lr=3.0)
    assert id(model.scale) in ids(decay["params"])
    assert decay["lr"] == no_decay["lr"] == 3.0


def test_shared_and_frozen_parameters():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    model[0].bias.requires_grad_(False)
    decay, no_decay = param_groups(model)
    assert [id(p) for p in decay["params"]] == [id(model[0].weight)]
    assert ids(no_decay["params"]) == {id(model[1].bias)}


def test_bad_arguments():
    with pytest.raises(ValueError, match="model"):
        param_groups([torch.zeros(2)])
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(nn.Linear(2, 2), weight_decay=-1)

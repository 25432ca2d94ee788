"""The names users import: every public name of noam_ext and noam_ext.schedules, listed
here, imports from where the docs say and is the same object from both places. A name
removed or moved breaks this test before it breaks a user."""

import importlib

import pytest

import noam_ext

TOP_LEVEL = [
    "FusedAdamW", "dequantized_state_dict", "InOpScheduleLR", "param_groups", "build_info", "cpu_capability",
    "Schedule", "Noam", "WarmupConstant", "WarmupLinear", "WarmupCosine", "WarmupStableDecay", "WarmupInverseSqrt",
    "noam_lr", "noam_peak_lr", "warmup_constant_lr", "warmup_linear_lr", "warmup_cosine_lr", "wsd_lr",
    "warmup_inverse_sqrt_lr",
    "TransformerLRScheduler", "ScheduleLR", "WarmupConstantLR", "WarmupLinearLR", "WarmupCosineLR",
    "WarmupStableDecayLR", "WarmupInverseSqrtLR",
]
SCHEDULES = [name for name in TOP_LEVEL if name not in ("FusedAdamW", "dequantized_state_dict", "param_groups",
                                                          "build_info", "cpu_capability")] + ["DECAY_SHAPES"]
ELSEWHERE = {"noam_ext.optimizer": ["FusedAdamW", "Noam"], "noam_ext.param_groups": ["param_groups"]}


def test_the_top_level_names_are_exactly_these():
    assert sorted(noam_ext.__all__) == sorted(TOP_LEVEL)


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_each_top_level_name_imports(name):
    assert getattr(noam_ext, name) is not None


@pytest.mark.parametrize("name", SCHEDULES)
def test_each_schedule_name_imports_from_noam_ext_schedules_as_the_same_object(name):
    schedules = importlib.import_module("noam_ext.schedules")
    assert name in schedules.__all__
    if hasattr(noam_ext, name):
        assert getattr(schedules, name) is getattr(noam_ext, name)


@pytest.mark.parametrize("module,names", ELSEWHERE.items())
def test_names_kept_for_older_imports(module, names):
    imported = importlib.import_module(module)
    for name in names:
        assert getattr(imported, name) is getattr(noam_ext, name)


def test_schedule_classes_pickle_under_their_public_module():
    import pickle
    data = pickle.dumps(noam_ext.WarmupCosine(10, 100))
    assert b"noam_ext.schedules\x94" in data or b"noam_ext.schedules\n" in data
    assert pickle.loads(data) == noam_ext.WarmupCosine(10, 100)

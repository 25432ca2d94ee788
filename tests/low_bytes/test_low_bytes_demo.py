"""python examples/low_bytes_demo.py run end to end for a few steps (a smoke test: the
convergence figures themselves come from a full run, benchmarks/low_bytes_training.md), and
its plateau detection on made-up curves."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))   # the demos are scripts, not part of the package
from low_bytes_demo import VARIANTS, smoothed, stops_improving  # noqa: E402
STEPS = 4
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def test_every_variant_trains_from_the_same_weights_and_the_outputs_are_written(tmp_path):
    # Started in the repository root, as a user of the clone would (the source folder holds
    # the compiled extension after an in-place build or an editable install).
    run = subprocess.run([sys.executable, "examples/low_bytes_demo.py", "--steps", str(STEPS), "--warmup", "2",
                          "--eval-batch", "16", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    payload = json.loads((tmp_path / "low_bytes_training.json").read_text())
    variants = payload["variants"]
    # Every variant, but the optional peers (torchao's and bitsandbytes' AdamW8bit) where their
    # library is not installed, in the demo's order.
    installed = {v.key for v in VARIANTS if v.peer is None or importlib.util.find_spec(v.peer) is not None}
    assert tuple(variants) == tuple(v.key for v in VARIANTS if v.key in installed)
    assert {"fp32_8bit", "bf16_stochastic_8bit"} <= set(variants)
    for key, entry in variants.items():
        assert len(entry["losses"]) == STEPS and all(math.isfinite(x) for x in entry["losses"]), key
        assert math.isfinite(entry["final_loss"]) and 1 <= entry["stops_improving_at"] <= STEPS
        assert 0.0 <= entry["sequence_accuracy"] <= entry["token_accuracy"] <= 1.0, key
        # the warmup (torchao keeps the lr as a float32 tensor: equal to float32's rounding)
        assert entry["lrs"][0] == 0.0 and entry["lrs"][-1] == pytest.approx(payload["args"]["lr"], rel=1e-7), \
            entry["lrs"]

    # The same start: every model's initial weights, rounded to bfloat16, hash alike, and the
    # bfloat16 models see the same first batch through the same weights, so their first
    # losses are equal to the bit; the float32 model's differs by bfloat16 rounding only.
    assert len({entry["initial_digest"] for entry in variants.values()}) == 1
    first = {key: entry["first_loss"] for key, entry in variants.items()}
    # The bfloat16 models start from the same rounded weights, the float32 ones from the
    # float32 weights: equal first losses within each dtype.
    dtype = {v.key: v.dtype for v in VARIANTS}
    bf16_first = {first[key] for key in variants if dtype[key] == torch.bfloat16}
    assert len(bf16_first) == 1, first
    assert len({first[key] for key in variants if dtype[key] == torch.float32}) == 1, first
    assert abs(first["fp32_torch"] - bf16_first.pop()) < 0.05, first

    assert variants["fp32_torch"]["largest_gap_to_reference"] == 0.0
    # The gap the demo reports is the largest |moving-mean loss - float32's| over the run,
    # recomputed here from the losses it saved; the bfloat16 variants do differ from float32.
    reference = smoothed(variants["fp32_torch"]["losses"])
    for key, entry in variants.items():
        gap = max(abs(a - b) for a, b in zip(smoothed(entry["losses"]), reference))
        assert entry["largest_gap_to_reference"] == pytest.approx(gap, rel=1e-9, abs=1e-12), key
    assert any(entry["largest_gap_to_reference"] > 0.0 for entry in variants.values())

    # Both master forms hold the same float32 master bit for bit, so they train identically.
    assert variants["bf16_master"]["losses"] == variants["bf16_remainder"]["losses"]

    table = (tmp_path / "low_bytes_training.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert [row.split(" | ")[0][2:] for row in rows] == [entry["label"] for entry in variants.values()]
    assert payload["machine"]["date"] in table and payload["machine"]["cpu"] in table
    assert f"--steps {STEPS}" in table
    if HAS_MATPLOTLIB:
        assert (tmp_path / "low_bytes_training.png").stat().st_size > 10_000
    else:
        assert "matplotlib not installed" in run.stdout


def test_stops_improving_finds_where_the_curve_flattens():
    falling_then_flat = [2.0 - 0.01 * i for i in range(100)] + [1.01] * 200
    step = stops_improving(falling_then_flat, window=10, tolerance=0.01)
    assert 95 <= step <= 110, step
    still_falling = [2.0 - 0.01 * i for i in range(150)]
    assert stops_improving(still_falling, window=10, tolerance=0.01) >= 148
    flat = [1.0] * 50
    assert stops_improving(flat, window=10, tolerance=0.01) == 1
    # Noise smaller than the tolerance is not improvement.
    noisy_flat = [1.0 + 0.004 * (-1) ** i for i in range(60)]
    assert stops_improving(noisy_flat, window=4, tolerance=0.01) == 1

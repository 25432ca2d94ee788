"""benchmarks/bench_step.py --quick runs end to end (a smoke test: no timing is asserted)."""

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_step.py"
OPTIMIZERS = {"noam_ext", "torch for-loop", "torch foreach", "torch fused"}
TORCH = OPTIMIZERS - {"noam_ext"}
ZERO_GRADS = ("optimizer.zero_grad()", "model.zero_grad()")
CLIP_MAX_NORM = 0.01   # bench_step.py's default (clipping active in every row)


def test_quick_benchmark_writes_table_json_and_chart(tmp_path):
    run = subprocess.run([sys.executable, str(BENCH), "--quick", "--min-run-time", "0.01", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    payload = json.loads((tmp_path / "bench_cpu_quick.json").read_text())
    assert payload["machine"]["torch"] and payload["machine"]["threads"] >= 1
    assert payload["machine"]["cpu"] and payload["machine"]["cores"] >= 1
    # The clipping rows are required: this fails while the installed noam_ext lacks
    # FusedAdamW.clip_grad_norm_ (the benchmark itself then skips them and says why).
    assert payload["clip_skipped"] is None, payload["clip_skipped"]

    # Whole training iterations: both models, each with both ways of zeroing the gradients,
    # and with optimizer.zero_grad() plus gradient clipping.
    rows = payload["iteration"]
    assert sorted((r["kind"], r["zero_grad"], r["clip_max_norm"] or 0.0) for r in rows) == sorted(
        [(kind, zero, 0.0) for kind in ("mlp", "transformer") for zero in ZERO_GRADS]
        + [(kind, "optimizer.zero_grad()", CLIP_MAX_NORM) for kind in ("mlp", "transformer")])
    for row in rows:
        assert row["params"] > 0 and row["tensors"] > 0 and row["iterations"] >= 1
        assert OPTIMIZERS | {"fwd+bwd only"} <= set(row["timings"])
        assert all(t["median_s"] > 0 and t["runs"] == row["iterations"] for t in row["timings"].values())
        assert all(len(ts) == row["iterations"] for ts in row["times_s"].values())
        assert set(row["ratios_over_ours"]) == TORCH
        assert row["ours_vs_torch_fused"] == row["ratios_over_ours"]["torch fused"] > 0
        # Every optimizer really trained its copy: same data and dropout masks as torch
        # for-loop, so its parameters end where torch for-loop's do, up to rounding.
        assert set(row["param_gap"]) == OPTIMIZERS
        assert all(math.isfinite(g) and g < 0.05 for g in row["param_gap"].values()), row["param_gap"]
        if row["clip_max_norm"] is None:
            assert row["clip_norms"] == {} and row["clip_active"] == {}
            continue
        # Every optimizer clipped (the reference without optimizer does not), and ours
        # returned the norm torch's clip_grad_norm_ did (same data, parameters equal up to
        # rounding).
        assert set(row["clip_norms"]) == set(row["clip_active"]) == OPTIMIZERS
        assert all(math.isfinite(n) and n > 0 for n in row["clip_norms"].values()), row["clip_norms"]
        assert all(0 <= a <= 1 for a in row["clip_active"].values())
        reference = row["clip_norms"]["torch for-loop"]
        assert abs(row["clip_norms"]["noam_ext"] - reference) <= 1e-3 * reference, row["clip_norms"]

    # One step alone, including the flat-view layout.
    kinds = {r["kind"] for r in payload["results"]}
    assert kinds == {"flat", "transformer", "flat-view", "small"}
    for result in payload["results"]:
        assert OPTIMIZERS <= set(result["timings"])
        assert all(t["median_s"] > 0 for t in result["timings"].values())
        assert result["ceiling_gbps"] > 0
    stacks = {r["stack"] for r in payload["results"] if r["kind"] == "flat-view"}
    assert stacks and stacks == {r["stack"] for r in payload["results"] if r["kind"] == "transformer"}

    # Clip + step: in --quick every flat and transformer layout, ours against each torch AdamW.
    clip_rows = payload["clip_step"]
    assert sorted(r["name"] for r in clip_rows) == sorted(
        r["name"] for r in payload["results"] if r["kind"] in ("flat", "transformer"))
    for row in clip_rows:
        assert row["max_norm"] == CLIP_MAX_NORM and row["params"] > 0 and row["ceiling_gbps"] > 0
        assert set(row["timings"]) == set(row["gbps"]) == set(row["over_step_alone"]) == OPTIMIZERS
        assert all(t["median_s"] > 0 for t in row["timings"].values())
        assert set(row["ratios_over_ours"]) == TORCH and all(v > 0 for v in row["ratios_over_ours"].values())
        assert row["bytes_per_param"] == {"noam_ext": 32, **{p: 40 for p in TORCH}}
        assert all(v > 0 for v in row["gbps"].values()) and all(v > 0 for v in row["over_step_alone"].values())

    # Tables: iterations first, then steps, on stdout and in the markdown file.
    table = (tmp_path / "bench_cpu_quick.md").read_text()
    for text in (run.stdout, table):
        assert "| model |" in text and "| layout |" in text
        assert text.index("| model |") < text.index("| layout |") < text.index("### Clip + step")
        assert "ours vs torch fused" in text and "model.zero_grad()" in text and "flat-view" in text
        assert text.count("**with clip_grad_norm_**") == 2   # one iteration row per model
        for row in rows:
            assert row["model"] in text
        clip_table = text[text.index("### Clip + step"):]
        assert "| noam_ext clip + step |" in clip_table and "GB/s (32 B)" in clip_table
        for row in clip_rows:
            assert f"| {row['name']} |" in clip_table
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "bench_cpu_quick.png").stat().st_size > 0
    assert (tmp_path / "bench_cpu_quick_iteration.png").stat().st_size > 0
    assert (tmp_path / "bench_cpu_quick_clip.png").stat().st_size > 0

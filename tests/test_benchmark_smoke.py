"""benchmarks/bench_step.py --quick runs end to end (a smoke test: no timing is asserted)."""

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_step.py"
OPTIMIZERS = {"noam_ext", "torch for-loop", "torch foreach", "torch fused"}
TORCH = OPTIMIZERS - {"noam_ext"}


def test_quick_benchmark_writes_table_json_and_chart(tmp_path):
    run = subprocess.run([sys.executable, str(BENCH), "--quick", "--min-run-time", "0.01", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    payload = json.loads((tmp_path / "bench_cpu_quick.json").read_text())
    assert payload["machine"]["torch"] and payload["machine"]["threads"] >= 1
    assert payload["machine"]["cpu"] and payload["machine"]["cores"] >= 1

    # Whole training iterations: both models, each with both ways of zeroing the gradients.
    rows = payload["iteration"]
    assert {(r["kind"], r["zero_grad"]) for r in rows} == {
        (kind, zero) for kind in ("mlp", "transformer") for zero in ("optimizer.zero_grad()", "model.zero_grad()")}
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

    # One step alone, including the flat-view layout.
    kinds = {r["kind"] for r in payload["results"]}
    assert kinds == {"flat", "transformer", "flat-view", "small"}
    for result in payload["results"]:
        assert OPTIMIZERS <= set(result["timings"])
        assert all(t["median_s"] > 0 for t in result["timings"].values())
        assert result["ceiling_gbps"] > 0
    stacks = {r["stack"] for r in payload["results"] if r["kind"] == "flat-view"}
    assert stacks and stacks == {r["stack"] for r in payload["results"] if r["kind"] == "transformer"}

    # Tables: iterations first, then steps, on stdout and in the markdown file.
    table = (tmp_path / "bench_cpu_quick.md").read_text()
    for text in (run.stdout, table):
        assert "| model |" in text and "| layout |" in text
        assert text.index("| model |") < text.index("| layout |")
        assert "ours vs torch fused" in text and "model.zero_grad()" in text and "flat-view" in text
        for row in rows:
            assert row["model"] in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "bench_cpu_quick.png").stat().st_size > 0
    assert (tmp_path / "bench_cpu_quick_iteration.png").stat().st_size > 0

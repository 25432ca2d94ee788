"""benchmarks/bench_step.py --quick, and its --profile gpu-check on the CPU, run end to end
(smoke tests: no timing is asserted)."""

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
PARALLEL = ("fsdp2", "tensor_parallel")
HEADERS = ("|---", "| model |", "| layout |", "| configuration |")   # table header lines


def data_rows(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith(HEADERS)]


def assert_rows_streamed(out_dir, table: str, count: int) -> None:
    """<out>/rows.md holds every row of the final tables, written as each was measured."""
    streamed = (out_dir / "rows.md").read_text()
    lines = set(table.splitlines())
    assert all(line in lines for line in streamed.splitlines() if line.startswith("|")), streamed
    assert len(data_rows(streamed)) == count, streamed


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

    # Distributed: FSDP2 and tensor-parallel DTensor parameters, 2 processes on gloo.
    assert payload["distributed_skipped"] is None, payload["distributed_skipped"]
    assert payload["distributed_failure"] is None, payload["distributed_failure"]
    dist_rows = payload["distributed"]
    assert sorted(r["parallel"] for r in dist_rows) == sorted(PARALLEL * 2)
    assert len({r["name"] for r in dist_rows}) == 2
    for row in dist_rows:
        assert set(row["timings"]) == set(row["rank_timings"]) == set(row["param_gap"]) == OPTIMIZERS
        assert all(t["median_s"] > 0 and t["runs"] == row["iterations"] for t in row["timings"].values())
        for name, per_rank in row["rank_timings"].items():   # the slower rank's median is the figure
            assert len(per_rank) == 2 and row["timings"][name] == max(per_rank, key=lambda t: t["median_s"])
        assert set(row["ratios_over_ours"]) == TORCH and row["ours_vs_torch_fused"] > 0
        assert row["dtensors"] == row["tensors"] == sum(row["placements"].values()) > 0
        expected = {"Shard(0)"} if row["parallel"] == "fsdp2" else {"Shard(0)", "Shard(1)", "Replicate"}
        assert set(row["placements"]) == expected, row["placements"]
        assert all(n > 0 for n in row["local_params"]) and sum(row["local_params"]) >= row["params"]
        # Every optimizer updated the parameters as torch for-loop did, and that moved them.
        assert row["reference_moved"] > 0
        assert all(math.isfinite(g) and g < 0.05 for g in row["param_gap"].values()), row["param_gap"]
    for text in (run.stdout, table):
        distributed_table = text[text.index("### One optimizer step on DTensor parameters"):]
        assert text.index("### Clip + step") < text.index("### One optimizer step on DTensor parameters")
        for row in dist_rows:
            assert f"| {row['label']} |" in distributed_table
    assert_rows_streamed(tmp_path, table, len(rows) + len(payload["results"]) + len(clip_rows) + len(dist_rows))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "bench_cpu_quick_distributed.png").stat().st_size > 0
    assert (tmp_path / "bench_cpu_quick.png").stat().st_size > 0
    assert (tmp_path / "bench_cpu_quick_iteration.png").stat().st_size > 0
    assert (tmp_path / "bench_cpu_quick_clip.png").stat().st_size > 0


def test_gpu_check_profile_on_the_cpu(tmp_path):
    """--profile gpu-check, gpu_check.sh's profile, on the CPU: capped at 2e6 parameters per
    layout (--max-params) to fit a smoke test, it keeps flat 1e6, the ~1e6 transformer-shaped
    stack (clip + step on it, the largest stack left) and 200 tiny tensors, runs the
    iteration section on the small models and no distributed section, and writes every
    row to rows.md as it is measured."""
    run = subprocess.run([sys.executable, str(BENCH), "--profile", "gpu-check", "--device", "cpu",
                          "--max-params", "2e6", "--min-run-time", "0.01", "--iterations", "3", "--warmup", "1",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "NOTE: --max-params 2e+06: skipping flat 1e+07, flat 1e+08, transformer 100.9M" in run.stderr
    payload = json.loads((tmp_path / "bench_cpu_gpu_check.json").read_text())
    assert payload["clip_skipped"] is None, payload["clip_skipped"]
    assert [r["name"] for r in payload["results"]] == [
        "flat 1e+06", "transformer 1.0M (60 tensors)", "200 tensors x 5"]
    assert [r["name"] for r in payload["clip_step"]] == ["transformer 1.0M (60 tensors)"]
    rows = payload["iteration"]
    assert sorted((r["kind"], r["zero_grad"], r["clip_max_norm"] or 0.0) for r in rows) == sorted(
        [(kind, zero, 0.0) for kind in ("mlp", "transformer") for zero in ZERO_GRADS]
        + [(kind, "optimizer.zero_grad()", CLIP_MAX_NORM) for kind in ("mlp", "transformer")])
    assert all(r["params"] < 2_000_000 and r["iterations"] == 3 for r in rows)   # the small models
    assert all(math.isfinite(g) and g < 0.05 for r in rows for g in r["param_gap"].values())
    assert payload["distributed"] == [] and payload["distributed_skipped"] is None
    table = (tmp_path / "bench_cpu_gpu_check.md").read_text()
    assert "DTensor" not in table
    assert_rows_streamed(tmp_path, table, len(rows) + len(payload["results"]) + len(payload["clip_step"]))


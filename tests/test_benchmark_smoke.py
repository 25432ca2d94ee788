"""benchmarks/bench_step.py --quick runs end to end (a smoke test: no timing is asserted)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_step.py"


def test_quick_benchmark_writes_table_json_and_chart(tmp_path):
    run = subprocess.run([sys.executable, str(BENCH), "--quick", "--min-run-time", "0.01", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    payload = json.loads((tmp_path / "bench_cpu_quick.json").read_text())
    assert payload["machine"]["torch"] and payload["machine"]["threads"] >= 1
    kinds = {r["kind"] for r in payload["results"]}
    assert kinds == {"flat", "transformer", "small"}
    for result in payload["results"]:
        assert {"noam_ext", "torch for-loop", "torch foreach", "torch fused"} <= set(result["timings"])
        assert all(t["median_s"] > 0 for t in result["timings"].values())
        assert result["ceiling_gbps"] > 0
    assert "| layout |" in run.stdout
    assert (tmp_path / "bench_cpu_quick.md").exists()

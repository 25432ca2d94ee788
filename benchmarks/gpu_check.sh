#!/usr/bin/env bash
# One call on a bare GPU machine (PyTorch, nvcc, ninja, pytest; no network):
# build noam_ext for the visible card, run the CUDA tests, run compute-sanitizer
# memcheck over a small step loop, run the benchmark, print a summary last.
# Meant to finish in under 6 minutes on an H100/H200: each stage has its own
# timeout (tests 150 s, each sanitizer tool 45 s, benchmark 100 s) so that a hang
# in one still leaves the summary. Writes logs to
# ${OUT:-gpu_check_out}/ (the device tool's $OUT when set).
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p "${OUT:-gpu_check_out}"
OUT_DIR="$(cd "${OUT:-gpu_check_out}" && pwd)"
export PYTHONUNBUFFERED=1
declare -A RESULT
stage() { printf '\n==> [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT_DIR/gpu.txt"

stage "build (TORCH_CUDA_ARCH_LIST from the visible GPU)"
unset TORCH_CUDA_ARCH_LIST
start=$SECONDS
if NOAM_EXT_FORCE_CUDA=1 python -m pip install --no-build-isolation --no-deps --no-index -q . >"$OUT_DIR/build.log" 2>&1; then
  RESULT[build]="ok (pip, $((SECONDS - start)) s)"
elif python benchmarks/jit_build.py >>"$OUT_DIR/build.log" 2>&1; then
  RESULT[build]="ok (JIT fallback, $((SECONDS - start)) s)"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # import the source tree, where the JIT build went
else
  RESULT[build]="FAILED (see build.log)"
  tail -40 "$OUT_DIR/build.log"
fi
(cd /tmp && python -c "import noam_ext; print(noam_ext.build_info())") 2>&1 | tee -a "$OUT_DIR/build.log"

stage "CUDA tests"
(cd tests && timeout 150 python -m pytest -q --import-mode=importlib -p no:cacheprovider \
    test_cuda.py test_cuda_emulation.py -x -rs) >"$OUT_DIR/tests.log" 2>&1
rc=$?
RESULT[tests]="$(tail -n 1 "$OUT_DIR/tests.log") (exit $rc)"
tail -n 25 "$OUT_DIR/tests.log"

stage "compute-sanitizer (memcheck, racecheck, synccheck) over a small step loop"
cat > "$OUT_DIR/sanitize_loop.py" <<'PY'
import torch, noam_ext
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    # tiny, odd and multi-chunk tensors, two groups (one amsgrad): several blocks, tails, segment walks
    params = [torch.nn.Parameter(torch.randn(n, device="cuda", dtype=dtype))
              for n in (1, 3, 4097, 16385, 5, *[7] * 40, 40000)]
    opt = noam_ext.FusedAdamW([{"params": params[:3]}, {"params": params[3:], "amsgrad": True}],
                              lr=1.0, schedule=noam_ext.Noam(64, 10))
    for step in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
torch.cuda.synchronize()
print("sanitizer loop done")
PY
if command -v compute-sanitizer >/dev/null 2>&1; then
  summary=""
  for tool in memcheck racecheck synccheck; do
    (cd /tmp && timeout 45 compute-sanitizer --tool "$tool" --error-exitcode 9 python "$OUT_DIR/sanitize_loop.py") \
      >"$OUT_DIR/$tool.log" 2>&1
    rc=$?
    summary+="$tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT_DIR/$tool.log" | tail -n 1) (exit $rc); "
    tail -n 3 "$OUT_DIR/$tool.log"
  done
  RESULT[sanitizer]="$summary"
else
  RESULT[sanitizer]="compute-sanitizer not found"
fi

stage "benchmark"
if [[ -f benchmarks/bench_step.py ]]; then
  timeout 100 python benchmarks/bench_step.py --device cuda --min-run-time 0.2 --out "$OUT_DIR" >"$OUT_DIR/bench.log" 2>&1
  RESULT[bench]="exit $? (table in bench.log)"
  cat "$OUT_DIR/bench.log" | tail -n 40
else
  RESULT[bench]="benchmarks/bench_step.py not present yet"
fi

stage "summary"
printf '| stage | result |\n|---|---|\n'
for key in build tests sanitizer bench; do
  printf '| %s | %s |\n' "$key" "${RESULT[$key]:-not run}"
done | tee "$OUT_DIR/summary.md"

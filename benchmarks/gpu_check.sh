#!/usr/bin/env bash
# One call on a bare GPU machine (PyTorch, nvcc, ninja, pytest; no network): build
# noam_ext for the visible card, run the CUDA tests, the GPU benchmark, then
# compute-sanitizer over a small step loop, and print a summary last. Every stage
# has its own timeout so that the whole script ends within 6 minutes on an
# H100/H200 even when a stage hangs, and the most valuable results come first:
#   build 180 s, tests 60 s, benchmark 60 s, memcheck and initcheck 30 s each.
# (No racecheck or synccheck: the kernels use no shared memory and no barriers;
# initcheck catches a read of a coefficient the prepare launch did not write.) A failed build
# stops the script: later stages would test whatever build was installed before.
# Without a GPU (a rehearsal) it builds for sm_90 and the GPU stages report skips.
# Each stage prints its result as it finishes. Logs go to ${OUT:-gpu_check_out}/
# (the device tool's $OUT when set).
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p "${OUT:-gpu_check_out}"
OUT_DIR="$(cd "${OUT:-gpu_check_out}" && pwd)"
export PYTHONUNBUFFERED=1
declare -A RESULT
START=$SECONDS
stage() { printf '\n==> [%s, %3d s] %s\n' "$(date +%H:%M:%S)" "$((SECONDS - START))" "$*"; }
done_stage() { RESULT[$1]="$2"; printf -- '--> %s: %s\n' "$1" "$2"; }

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT_DIR/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT_DIR/gpu.txt"

stage "build (TORCH_CUDA_ARCH_LIST from the visible GPU), at most 180 s"
unset TORCH_CUDA_ARCH_LIST
if ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  # A rehearsal without a GPU: build for one card, as a GPU machine would (sm_90).
  export TORCH_CUDA_ARCH_LIST=9.0
  echo "no GPU visible: building for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST; the CUDA tests will skip"
fi
start=$SECONDS
if timeout 180 env NOAM_EXT_FORCE_CUDA=1 MAX_JOBS="$(nproc)" \
    python -m pip install --no-build-isolation --no-deps --no-index -q . >"$OUT_DIR/build.log" 2>&1; then
  done_stage build "ok ($((SECONDS - start)) s)"
else
  done_stage build "FAILED or timed out after $((SECONDS - start)) s (see build.log)"
  tail -40 "$OUT_DIR/build.log"
  printf '| stage | result |\n|---|---|\n| build | %s |\n' "${RESULT[build]}" | tee "$OUT_DIR/summary.md"
  exit 1
fi
(cd /tmp && python -c "import noam_ext; print(noam_ext.build_info())") 2>&1 | tee -a "$OUT_DIR/build.log"

stage "CUDA tests, at most 60 s (every failure reported, not only the first)"
(cd tests && timeout 60 python -m pytest -q --import-mode=importlib -p no:cacheprovider \
    test_cuda.py test_cuda_emulation.py --maxfail=50 -rfs) >"$OUT_DIR/tests.log" 2>&1
rc=$?
done_stage tests "$(tail -n 1 "$OUT_DIR/tests.log") (exit $rc)"
grep -E "^(FAILED|ERROR)" "$OUT_DIR/tests.log" | head -n 30

stage "benchmark, at most 60 s"
if python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  timeout 60 python benchmarks/bench_step.py --device cuda --profile gpu-check \
      --out "$OUT_DIR" >"$OUT_DIR/bench.log" 2>&1
  done_stage bench "exit $? (tables in bench.log)"
  tail -n 40 "$OUT_DIR/bench.log"
else
  done_stage bench "skipped: no GPU visible"
fi

stage "compute-sanitizer (memcheck, initcheck) over a small step loop, at most 30 s each"
cat > "$OUT_DIR/sanitize_loop.py" <<'PY'
import torch, noam_ext
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    # tiny, odd, multi-chunk and misaligned tensors in 42 groups (one amsgrad, a Tensor
    # lr on the GPU): several blocks, warp parts, tails, row walks, the element path
    # and hyperparameter rows past the old limit of 32
    base = torch.randn(20000, device="cuda", dtype=dtype)
    params = [torch.nn.Parameter(torch.randn(n, device="cuda", dtype=dtype))
              for n in (1, 3, 4097, 16385, 5, *[7] * 40, 40000)]
    params.append(torch.nn.Parameter(base[1:12001]))   # not 16-byte aligned
    groups = ([{"params": params[:3], "lr": torch.tensor(0.5, device="cuda")}]
              + [{"params": [p]} for p in params[5:45]] + [{"params": params[3:5] + params[45:], "amsgrad": True}])
    opt = noam_ext.FusedAdamW(groups, lr=1.0, schedule=noam_ext.Noam(64, 10))
    for step in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
torch.cuda.synchronize()
print("sanitizer loop done")
PY
SANITIZER="$(command -v compute-sanitizer || true)"
if [[ -z "$SANITIZER" && -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/compute-sanitizer" ]]; then
  SANITIZER="$CUDA_HOME/bin/compute-sanitizer"
fi
if [[ -z "$SANITIZER" ]]; then
  SANITIZER="$(ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)"
fi
if [[ -n "$SANITIZER" ]]; then
  summary=""
  for tool in memcheck initcheck; do
    # The caching allocator would hide out-of-bounds accesses inside its blocks.
    (cd /tmp && PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 30 "$SANITIZER" --tool "$tool" --error-exitcode 9 \
        python "$OUT_DIR/sanitize_loop.py") >"$OUT_DIR/$tool.log" 2>&1
    rc=$?
    line="$tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT_DIR/$tool.log" | tail -n 1) (exit $rc)"
    summary+="$line; "
    printf -- '--> %s\n' "$line"
  done
  RESULT[sanitizer]="$summary"
else
  done_stage sanitizer "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda*/bin)"
fi

stage "summary"
printf '| stage | result |\n|---|---|\n'
for key in build tests bench sanitizer; do
  printf '| %s | %s |\n' "$key" "${RESULT[$key]:-not run}"
done | tee "$OUT_DIR/summary.md"
printf 'total: %d s\n' "$((SECONDS - START))" | tee -a "$OUT_DIR/summary.md"

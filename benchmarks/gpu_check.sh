#!/usr/bin/env bash
# One call on a lent GPU machine (PyTorch, nvcc, ninja, pytest; no network): build
# noam_ext for the visible card, then, most valuable first, the GPU tests, memcheck over
# a small step loop, the quick GPU benchmark and initcheck, and a one-screen summary.
#
# It must fit a lent machine's device time with room to spare (a session has 15 minutes,
# the machine's start included), whatever hangs: the whole script has a budget
# (GPU_CHECK_BUDGET_S, default 480 s) and each stage a cap,
#   build 300 s, smoke 60 s, tests 150 s, memcheck 75 s, benchmark 75 s, initcheck 60 s,
# cut to what the budget leaves after the later stages' minimum (the build, which every
# other stage needs, may take most of its cap; on 16 cores it should take 2-3 minutes).
# A stage that runs out is stopped with SIGINT, so that pytest (and compute-sanitizer)
# still print what they found, and killed 10 s later. The CUDA emulation tests are not run here: CI runs the
# kernels' own code on the host at every commit. No racecheck or synccheck: the kernels
# use no shared memory and no barriers; initcheck catches a read of a coefficient the
# prepare launch did not write.
#
# Without a GPU (a rehearsal) it builds for sm_90 and every GPU stage reports a skip.
# Logs and the summary go to ${OUT:-gpu_check_out}/ (the device tool's $OUT when set).
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p "${OUT:-gpu_check_out}"
OUT_DIR="$(cd "${OUT:-gpu_check_out}" && pwd)"
export PYTHONUNBUFFERED=1
BUDGET=${GPU_CHECK_BUDGET_S:-480}
START=$SECONDS
declare -A RESULT TOOK
ORDER=(build smoke tests memcheck bench initcheck)

stage() { printf '\n==> [%s, %3d s] %s\n' "$(date +%H:%M:%S)" "$((SECONDS - START))" "$*"; }
done_stage() { RESULT[$1]="$2"; TOOK[$1]="$3"; printf -- '--> %s: %s (%s s)\n' "$1" "$2" "$3"; }

# Seconds stage may run: its cap, or less where the budget must keep `later` seconds
# (the later stages' minimum) and 10 s for the summary.
allowance() {
  local cap=$1 later=$2
  local left=$((BUDGET - (SECONDS - START) - later - 10))
  ((left < cap)) && echo "$left" || echo "$cap"
}

# Runs a command under a time limit: SIGINT at the limit, SIGKILL 10 s later.
# Prints nothing; returns the command's status (124 or 130 after SIGINT, 137 if killed).
limited() {
  local seconds=$1; shift
  timeout -s INT -k 10 "$seconds" "$@"
}

how_it_ended() {   # status -> words
  case $1 in
    0) echo "ok" ;;
    124|130) echo "stopped at its time limit" ;;
    137) echo "killed at its time limit" ;;
    *) echo "exit $1" ;;
  esac
}

summary() {
  stage "summary"
  {
    printf 'noam_ext gpu_check, %s, %s\n' "$(date -u +%Y-%m-%dT%H:%MZ)" "$(head -n 1 "$OUT_DIR/gpu.txt" 2>/dev/null)"
    printf '| stage | s | result |\n|---|---|---|\n'
    for key in "${ORDER[@]}"; do
      printf '| %s | %s | %s |\n' "$key" "${TOOK[$key]:--}" "${RESULT[$key]:-not run}"
    done
    if [[ -s "$OUT_DIR/tests.log" ]]; then
      grep -E "^(FAILED|ERROR) " "$OUT_DIR/tests.log" | cut -c1-150 | head -n 8
    fi
    if [[ -s "$OUT_DIR/kernels.txt" ]]; then
      grep -E "update (float|bfloat16|half)( amsgrad)? |ERROR|SASS" "$OUT_DIR/kernels.txt" | grep sm_90 | head -n 6
      grep -E "ERROR|SASS:" "$OUT_DIR/kernels.txt" | head -n 2
    fi
    printf 'total: %d s of a %d s budget; logs in %s\n' "$((SECONDS - START))" "$BUDGET" "$OUT_DIR"
  } | tee "$OUT_DIR/summary.md"
}

GPU=0
python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null && GPU=1

stage "machine"
{
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  else
    echo "no GPU (no nvidia-smi)"
  fi
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  python -c "import pytest_timeout" 2>/dev/null && echo "pytest-timeout: yes" || echo "pytest-timeout: no"
} 2>&1 | tee "$OUT_DIR/gpu.txt"

stage "build (TORCH_CUDA_ARCH_LIST from the visible GPU)"
unset TORCH_CUDA_ARCH_LIST
if ((GPU == 0)); then
  # A rehearsal without a GPU: build for one card, as a GPU machine would (sm_90).
  export TORCH_CUDA_ARCH_LIST=9.0
  echo "no GPU visible: building for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST; the GPU stages will skip"
fi
t=$SECONDS
limit=$(allowance "${GPU_CHECK_BUILD_S:-300}" 150)
# -v: ptxas's report of each kernel's registers and spills goes to the log.
limited "$limit" env NOAM_EXT_FORCE_CUDA=1 MAX_JOBS="$(nproc)" \
  python -m pip install --no-build-isolation --no-deps --no-index -v . >"$OUT_DIR/build.log" 2>&1
rc=$?
if ((rc != 0)); then
  done_stage build "FAILED: $(how_it_ended $rc) after ${limit} s cap (see build.log)" $((SECONDS - t))
  tail -n 30 "$OUT_DIR/build.log"
  summary
  exit 1   # later stages would test whatever build was installed before
fi
so="$(cd /tmp && python -c 'import noam_ext._C as c; print(c.__file__)' 2>/dev/null)"
python scripts/check_cuda_kernels.py "$OUT_DIR/build.log" "$so" >"$OUT_DIR/kernels.txt" 2>&1
checks=$?
cat "$OUT_DIR/kernels.txt"
(cd /tmp && python -c "import noam_ext; print(noam_ext.build_info())") >>"$OUT_DIR/kernels.txt" 2>&1
done_stage build "ok; register and SASS checks: $( ((checks == 0)) && echo passed || echo FAILED)" $((SECONDS - t))

# The first minute on a GPU: do the launches reach nvcc's kernels (no GPU needed), and
# does one call of each storage give the CPU op's bits? If not, every later stage would
# only crash or hang on the same fault: stop here, with the budget mostly left.
stage "smoke: launch pointers, then each storage's step on the GPU against the CPU op"
t=$SECONDS
(cd tests && limited "$(allowance 60 60)" python -m pytest -q -x -p no:cacheprovider --import-mode=importlib \
    gpu_kernels/test_linked_extension.py "gpu_kernels/test_cuda.py::test_every_storage_on_the_gpu_matches_the_cpu_op_bit_for_bit") \
  >"$OUT_DIR/smoke.log" 2>&1
rc=$?
counts="$(grep -E "(passed|failed|skipped|error|no tests ran)" "$OUT_DIR/smoke.log" | tail -n 1 | tr -d '=' | xargs)"
done_stage smoke "${counts:-no pytest summary}; $(how_it_ended $rc)" $((SECONDS - t))
if ((rc != 0)); then
  tail -n 30 "$OUT_DIR/smoke.log"
  summary
  exit 1   # a launch that is broken here is broken in every later stage
fi

stage "GPU tests (tests/gpu_kernels/test_cuda.py), verbose"
t=$SECONDS
limit=$(allowance 150 90)
per_test=()
python -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout=60 --timeout-method=signal)
(cd tests && limited "$limit" python -m pytest -v -rfEs --import-mode=importlib -p no:cacheprovider \
    --maxfail=50 "${per_test[@]}" gpu_kernels/test_cuda.py) >"$OUT_DIR/tests.log" 2>&1
rc=$?
counts="$(grep -E "^=+ .*(passed|failed|skipped|error|no tests ran).* =+$" "$OUT_DIR/tests.log" | tail -n 1 | tr -d '=' | xargs)"
done_stage tests "${counts:-no pytest summary}; $(how_it_ended $rc)${per_test[*]:+, at most 60 s a test}" \
  $((SECONDS - t))
grep -E "^(FAILED|ERROR) " "$OUT_DIR/tests.log" | head -n 20

# A small step loop for compute-sanitizer: tiny, odd, multi-chunk tensors; a tensor at
# one offset (scalar head), one whose gradient alone is misaligned (element path); 42
# groups, one amsgrad, a Tensor lr on the GPU; the op with host hyperparameters; the
# bytes-by-launch upload that CUDA graph captures use. No graph capture itself: the
# caching allocator is off under the sanitizer (it would hide out-of-bounds accesses).
cat >"$OUT_DIR/sanitize_loop.py" <<'PY'
import torch, noam_ext
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    base = torch.randn(20000, device="cuda", dtype=dtype)
    odd_grad_param = torch.nn.Parameter(torch.randn(3001, device="cuda", dtype=dtype))
    params = [torch.nn.Parameter(torch.randn(n, device="cuda", dtype=dtype))
              for n in (1, 3, 4097, 16385, 5, *[7] * 40, 40000)]
    params += [torch.nn.Parameter(base[1:12001]), odd_grad_param]   # one element into a buffer
    groups = ([{"params": params[:3], "lr": torch.tensor(0.5, device="cuda")}]
              + [{"params": [p]} for p in params[5:45]] + [{"params": params[3:5] + params[45:], "amsgrad": True}])
    opt = noam_ext.FusedAdamW(groups, lr=1.0, schedule=noam_ext.Noam(64, 10))
    for step in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        odd_grad_param.grad = torch.randn(3002, device="cuda", dtype=dtype)[1:]
        opt.step()
# 8-bit moments: whole and tail blocks, a parameter one element into its buffer (the element
# path), a transposed one (the strided kernel), amsgrad; bfloat16 with stochastic rounding.
for dtype, options in ((torch.float32, {}), (torch.bfloat16, dict(stochastic_rounding=True))):
    base = torch.randn(20000, device="cuda", dtype=dtype)
    params = [torch.nn.Parameter(torch.randn(n, device="cuda", dtype=dtype)) for n in (1, 255, 257, 4097, 16385, 40000)]
    params += [torch.nn.Parameter(base[1:3001]), torch.nn.Parameter(torch.randn(300, 7, device="cuda", dtype=dtype).t())]
    groups = [{"params": params[:4]}, {"params": params[4:], "amsgrad": True}]
    opt = noam_ext.FusedAdamW(groups, lr=1.0, schedule=noam_ext.Noam(64, 10), moment_dtype="8bit", **options)
    for step in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
from noam_ext._hyper import BETA1, BETA2, EPS, LR, NUM_HYPER_COLUMNS
hyper = torch.zeros(2, NUM_HYPER_COLUMNS, dtype=torch.float64)   # no schedule, no weight decay
hyper[:, LR], hyper[:, BETA1], hyper[:, BETA2], hyper[:, EPS] = 1e-3, 0.9, 0.999, 1e-8
p = [torch.randn(n, device="cuda") for n in (3, 5000)]
torch.ops.noam_ext.fused_adamw_(p, [torch.randn_like(x) for x in p], [torch.zeros_like(x) for x in p],
                                [torch.zeros_like(x) for x in p], [], [torch.zeros((), device="cuda") for _ in p],
                                torch.zeros(2, dtype=torch.int64, device="cuda"), hyper, [0, 1])
table = torch.empty(1000, dtype=torch.float64, device="cuda")
torch.ops.noam_ext.upload_by_launch_(table, torch.arange(999, dtype=torch.float64))
torch.cuda.synchronize()
assert table[:999].equal(torch.arange(999, dtype=torch.float64, device="cuda"))
print("sanitizer loop done")
PY
SANITIZER="$(command -v compute-sanitizer || true)"
if [[ -z "$SANITIZER" && -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/compute-sanitizer" ]]; then
  SANITIZER="$CUDA_HOME/bin/compute-sanitizer"
fi
if [[ -z "$SANITIZER" ]]; then
  SANITIZER="$(ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)"
fi

sanitize() {   # tool cap later [only-ours]
  local tool=$1 cap=$2 later=$3 only_ours=${4:-}
  stage "compute-sanitizer --tool $tool over a small step loop"
  local t=$SECONDS
  if ((GPU == 0)); then done_stage "$tool" "skipped: no GPU visible" 0; return; fi
  if [[ -z "$SANITIZER" ]]; then
    done_stage "$tool" "skipped: compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda*/bin)" 0
    return
  fi
  local limit filter=()
  limit=$(allowance "$cap" "$later")
  if ((limit < 20)); then done_stage "$tool" "skipped: the budget is spent" 0; return; fi
  # memcheck: instrument only noam_ext's kernels, torch's run at full speed. Not for
  # initcheck, which must see torch's kernels write the memory ours then read.
  if [[ -n "$only_ours" ]] && "$SANITIZER" --help 2>/dev/null | grep -q -- "--kernel-name"; then
    filter=(--kernel-name kns=noam_ext)
  fi
  (cd /tmp && PYTORCH_NO_CUDA_MEMORY_CACHING=1 limited "$limit" "$SANITIZER" --tool "$tool" "${filter[@]}" \
      --error-exitcode 9 python "$OUT_DIR/sanitize_loop.py") >"$OUT_DIR/$tool.log" 2>&1
  local rc=$?
  local found
  found="$(grep -E "ERROR SUMMARY" "$OUT_DIR/$tool.log" | tail -n 1 | sed 's/^========= //')"
  done_stage "$tool" "${found:-no error summary}; $(how_it_ended $rc)" $((SECONDS - t))
  ((rc == 0)) || tail -n 15 "$OUT_DIR/$tool.log"
}

sanitize memcheck 75 85 only-ours

stage "benchmark: bench_step.py --profile gpu-check (quick GPU profile, rows written as measured)"
t=$SECONDS
if ((GPU == 0)); then
  done_stage bench "skipped: no GPU visible" 0
elif ! grep -q -- '"--profile"' benchmarks/bench_step.py; then
  done_stage bench "skipped: this bench_step.py has no --profile" 0
elif (($(allowance 75 30) < 20)); then
  done_stage bench "skipped: the budget is spent" 0
else
  limit=$(allowance 75 30)
  mkdir -p "$OUT_DIR/bench"
  limited "$limit" python benchmarks/bench_step.py --device cuda --profile gpu-check --out "$OUT_DIR/bench" \
    >"$OUT_DIR/bench.log" 2>&1
  rc=$?
  rows=$(grep -cE "^\|" "$OUT_DIR/bench/rows.md" 2>/dev/null || echo 0)
  done_stage bench "$rows table lines in bench/rows.md; $(how_it_ended $rc)" $((SECONDS - t))
  tail -n 25 "$OUT_DIR/bench/rows.md" 2>/dev/null || tail -n 15 "$OUT_DIR/bench.log"
fi

sanitize initcheck 60 0

summary

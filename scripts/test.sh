#!/usr/bin/env bash
# Installs what is needed and runs the whole test suite, twice when CUDA can be
# built: once on the build with CPU and CUDA implementations, once on the
# CPU-only build (NOAM_EXT_NO_CUDA=1). Extra arguments go to pytest.
# Fails on any failing test and on a run that collects no tests.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$REPO_ROOT"

run_suite() {
  local label="$1"; shift
  say "test suite: $label"
  # Run from tests/ with importlib mode so the installed package is imported,
  # not the source folder (which has no compiled _C).
  local status=0
  (cd "$REPO_ROOT/tests" && python -m pytest -p no:cacheprovider --import-mode=importlib \
      --rootdir="$REPO_ROOT" -c "$REPO_ROOT/pyproject.toml" "$@") || status=$?
  if [[ $status -eq 5 ]]; then
    echo "ERROR: pytest collected no tests ($label)" >&2
  fi
  return $status
}

if cuda_buildable; then
  install_noam_ext NOAM_EXT_FORCE_CUDA=1
  NOAM_EXT_EXPECT_CUDA_BUILD=1 run_suite "CPU + CUDA build" "$@"
else
  if ! compgen -G "$REPO_ROOT/csrc/cuda/*.cu" >/dev/null; then
    say "there is no CUDA source yet (csrc/cuda/*.cu): only the CPU build is made and tested"
  else
    say "CUDA cannot be built here (torch without CUDA, no nvcc, or NOAM_EXT_NO_CUDA=1)"
    if [[ "${NOAM_EXT_REQUIRE_CUDA:-0}" == "1" ]]; then
      echo "ERROR: NOAM_EXT_REQUIRE_CUDA=1 but the CUDA sources cannot be compiled here" >&2
      exit 1
    fi
  fi
fi
install_noam_ext NOAM_EXT_NO_CUDA=1
NOAM_EXT_EXPECT_CUDA_BUILD=0 run_suite "CPU-only build (NOAM_EXT_NO_CUDA=1)" "$@"
say "all test runs passed; .venv now holds the CPU-only build (scripts/demo.sh --device cuda rebuilds it with CUDA)"

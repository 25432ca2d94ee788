#!/usr/bin/env bash
# Builds noam_ext with AddressSanitizer and UndefinedBehaviorSanitizer (CPU only,
# NOAM_EXT_SANITIZE=1) into a folder of its own and runs the CPU test suite under
# them. The environment's normal build is left as it is. Extra arguments go to pytest.
#
#   bash scripts/sanitize.sh            # about 15 minutes on a 2-core machine
#
# libasan must be the first library loaded, and libstdc++ is preloaded with it:
# with libasan alone, the first C++ exception dies inside ASan's __cxa_throw
# interceptor (it cannot find the real one). Leak checking is off: CPython and
# torch keep memory until exit by design. Any report fails the run.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$REPO_ROOT"

TARGET="${NOAM_EXT_SANITIZE_DIR:-$REPO_ROOT/build/sanitize}"
say "building noam_ext with -fsanitize=address,undefined into $TARGET"
rm -rf "$TARGET"
NOAM_EXT_NO_CUDA=1 NOAM_EXT_SANITIZE=1 python -m pip install --no-build-isolation --no-deps -q --target "$TARGET" .

libasan="$(gcc -print-file-name=libasan.so)"
libstdcxx="$(gcc -print-file-name=libstdc++.so)"
for lib in "$libasan" "$libstdcxx"; do
  [[ -f "$lib" ]] || { echo "ERROR: $lib not found (install gcc's libasan)" >&2; exit 1; }
done

export PYTHONPATH="$TARGET" LD_PRELOAD="$libasan $libstdcxx"
export ASAN_OPTIONS="detect_leaks=0:verify_asan_link_order=0:halt_on_error=1:abort_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
(cd /tmp && python -c "import noam_ext, sys; assert noam_ext.__file__.startswith(sys.argv[1]), noam_ext.__file__; print('testing', noam_ext.__file__)" "$TARGET")

say "CPU test suite under ASan + UBSan (distributed and benchmark tests excluded: they only add time)"
cd "$REPO_ROOT/tests"
status=0
python -m pytest -p no:cacheprovider --import-mode=importlib --rootdir="$REPO_ROOT" \
      -c "$REPO_ROOT/pyproject.toml" -q --ignore=distributed --ignore=package/test_benchmark_harness.py "$@" || status=$?
if [[ $status -eq 5 ]]; then
  echo "ERROR: pytest collected no tests" >&2
fi
[[ $status -eq 0 ]] && say "sanitizers: clean"
exit $status

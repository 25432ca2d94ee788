#!/usr/bin/env bash
# Installs what is needed and runs noam_ext's demonstration. Extra arguments go to the demo.
# The demo runs on the CPU unless given --device cuda, so only then is the CUDA
# implementation built (compiling it takes minutes on a small machine).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NOAM_EXT_VENV:-$REPO_ROOT/.venv}"
run_demo() {
  export NOAM_EXT_DEMO_OUT="${NOAM_EXT_DEMO_OUT:-$REPO_ROOT/demo_out}"
  python "$REPO_ROOT/examples/train_demo.py" "$@"
}
# --help needs no installing when the environment is already there.
if [[ " $* " == *" --help "* || " $* " == *" -h "* ]] && [[ -x "$VENV/bin/python" ]] \
    && (cd /tmp && "$VENV/bin/python" -c "import noam_ext._C" 2>/dev/null); then
  source "$VENV/bin/activate"
  run_demo "$@"
  exit 0
fi
export NOAM_EXT_FOR=demo   # env.sh installs the build tools and the demo's, not the test-only packages
source "$REPO_ROOT/scripts/env.sh"
cd "$REPO_ROOT"
if [[ " $* " != *" --device cuda "* && " $* " != *" --device=cuda "* ]]; then
  export NOAM_EXT_NO_CUDA="${NOAM_EXT_NO_CUDA:-1}"
fi
ensure_noam_ext
run_demo "$@"

# Sourced by scripts/demo.sh and scripts/test.sh: makes (or reuses) a virtual
# environment with torch and the build/test tools, and finds the CUDA toolkit.
#
#   NOAM_EXT_VENV      where the environment lives (default: .venv in the repository)
#   NOAM_EXT_TORCH     pip arguments that install torch when it is missing (default: torch; e.g.
#                      "torch --index-url https://download.pytorch.org/whl/cpu" for the CPU-only build)
#   NOAM_EXT_PYTHON    interpreter that creates the environment (default: python3)
#   NOAM_EXT_USE_ACTIVE_ENV=1   use the active interpreter and its torch instead of a venv
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

say() { printf '\n==> %s\n' "$*" >&2; }

if [[ "${NOAM_EXT_USE_ACTIVE_ENV:-0}" != "1" ]]; then
  VENV="${NOAM_EXT_VENV:-$REPO_ROOT/.venv}"
  if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating a virtual environment in $VENV"
    "${NOAM_EXT_PYTHON:-python3}" -m venv "$VENV"
  fi
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
fi

python - <<'PY'
import sys
if sys.version_info < (3, 10):
    sys.exit(f"noam_ext needs Python >= 3.10, this is {sys.version.split()[0]}")
PY

if ! python -c "import torch" 2>/dev/null; then
  say "installing ${NOAM_EXT_TORCH:-torch} (a CUDA build of torch is several GB; this takes a minute or more)"
  # shellcheck disable=SC2086  # word splitting intended: NOAM_EXT_TORCH may hold pip options
  python -m pip install --progress-bar off ${NOAM_EXT_TORCH:-torch}
fi
if [[ "${NOAM_EXT_FOR:-tests}" == "demo" ]]; then
  # The demo needs the build tools and its plot and progress bar, not the test-only packages.
  say "installing build tools and the demo's (matplotlib, tqdm)"
  python -m pip install -q --progress-bar off "setuptools>=64" wheel ninja matplotlib tqdm
else
  say "installing build and test tools (transformers: the tests compare the schedules with its functions; accelerate and lightning: docs/integrations.md is run against them)"
  python -m pip install -q --progress-bar off "setuptools>=64" wheel ninja pytest hypothesis numpy matplotlib tqdm \
    transformers accelerate lightning
fi

# CUDA_HOME: the toolkit that the nvcc on PATH belongs to (nvcc may be a wrapper script).
if [[ -z "${CUDA_HOME:-}" ]] && command -v nvcc >/dev/null 2>&1; then
  top="$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)"
  if [[ -n "$top" && -d "$top" ]]; then
    CUDA_HOME="$(cd "$top" && pwd)"
    export CUDA_HOME
  fi
fi

# 0 or 1: whether this environment can build the CUDA implementation.
cuda_buildable() {
  [[ "${NOAM_EXT_NO_CUDA:-0}" != "1" ]] || return 1
  [[ -n "${CUDA_HOME:-}" ]] || return 1
  compgen -G "$REPO_ROOT/csrc/cuda/*.cu" >/dev/null || return 1
  python -c "import sys, torch; sys.exit(torch.version.cuda is None)"
}

# Compiler progress from pip's verbose build output on stdin: one line per source ninja
# compiled, with the time since the build started (the full output goes to the log).
build_progress() {
  local line source start=$SECONDS
  while IFS= read -r line; do
    if [[ "$line" =~ ^\ *(\[[0-9]+/[0-9]+\])\  && "$line" =~ \ -c\ ([^ ]+\.(cpp|cu))\  ]]; then
      source="${BASH_REMATCH[1]}"
      printf '    compiled %s (%d s)\n' "csrc/${source#*/csrc/}" $((SECONDS - start)) >&2
    elif [[ "$line" == *" -shared "* ]]; then
      printf '    linked noam_ext._C (%d s)\n' $((SECONDS - start)) >&2
    fi
  done
}

# Builds and installs noam_ext into the environment, editable: the compiled _C is built
# in place, next to the sources, so `import noam_ext` works from the repository root
# (a notebook or `python` started there) as well as from anywhere else, and the tests
# import exactly what was built. Extra arguments become environment for setup.py.
# Shows which source is being compiled, and a heartbeat while a long one (CUDA) runs.
install_noam_ext() {
  local variant="CPU and, where it can be built, CUDA" minutes="2"
  [[ " $* " == *" NOAM_EXT_NO_CUDA=1 "* ]] && variant="CPU only"
  [[ " $* " == *" NOAM_EXT_FORCE_CUDA=1 "* ]] && variant="CPU and CUDA" && minutes="3-4"
  say "building noam_ext ($variant) against torch $(python -c 'import torch; print(torch.__version__)'): about $minutes minutes on 2 cores"
  local log="$REPO_ROOT/build/pip-install.log"
  mkdir -p "$REPO_ROOT/build"
  local start=$SECONDS
  ( while sleep 60; do printf '    ... still building (%d s; compiler output in %s)\n' $((SECONDS - start)) "$log" >&2; done ) &
  local heartbeat=$!
  local status=0
  (cd "$REPO_ROOT" && env "$@" python -m pip install --no-build-isolation --no-deps --force-reinstall -v -e . 2>&1 \
      | tee "$log" | build_progress) || status=$?
  kill "$heartbeat" 2>/dev/null || true
  wait "$heartbeat" 2>/dev/null || true
  if [[ $status -ne 0 ]]; then
    tail -n 60 "$log" >&2
    echo "ERROR: building noam_ext failed (full log: $log)" >&2
    return 1
  fi
  say "built in $((SECONDS - start)) s"
  cuda_kernel_checks "$log"
  (cd /tmp && python -c "import noam_ext, json; print('noam_ext build:', json.dumps(noam_ext.build_info()))")
  echo "$(source_hash) $(build_variant "$@")" > "$(python -c 'import sys; print(sys.prefix)')/.noam_ext_source_hash"
}

# The CUDA kernels' resources as ptxas reported them in a build log (setup.py builds
# with -Xptxas=-v and fails on any spill), one line per kernel and architecture, and
# the checks scripts/check_cuda_kernels.py makes on them and on the SASS: resident
# blocks per SM, and 16-byte vector stores. Fails the build when a check fails.
cuda_kernel_checks() {
  grep -q "ptxas info" "$1" || return 0
  local so report="$REPO_ROOT/build/cuda_kernels.log"
  so="$(cd /tmp && python -c 'import noam_ext._C as c; print(c.__file__)')"
  if ! python "$REPO_ROOT/scripts/check_cuda_kernels.py" "$1" "$so" >"$report" 2>&1; then
    cat "$report" >&2
    echo "ERROR: the CUDA kernel checks failed (scripts/check_cuda_kernels.py)" >&2
    return 1
  fi
  say "CUDA kernels: registers, spills and 16-byte stores checked ($(grep -c " registers (" "$report") kernels; table in $report)"
}

# Which build a set of setup.py switches makes: "cpu" or "cuda".
build_variant() {
  if [[ " $* " == *" NOAM_EXT_NO_CUDA=1 "* ]] || ! cuda_buildable; then echo cpu; else echo cuda; fi
}

# A hash of everything the build is made from, to tell when the installed build is stale.
source_hash() {
  (cd "$REPO_ROOT" && cat setup.py pyproject.toml $(find csrc noam_ext -type f \( -name '*.py' -o -name '*.h' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.cu' \) | sort) | sha256sum | cut -c1-16)
}

# Builds noam_ext unless the installed build was made from the current sources.
# NOAM_EXT_NO_CUDA=1 asks for the CPU-only build; an installed CUDA build serves too.
ensure_noam_ext() {
  local stamp installed
  stamp="$(python -c 'import sys; print(sys.prefix)')/.noam_ext_source_hash"
  installed="$(cat "$stamp" 2>/dev/null || true)"
  if [[ "$installed" == "$(source_hash) cuda" || "$installed" == "$(source_hash) $(build_variant "NOAM_EXT_NO_CUDA=${NOAM_EXT_NO_CUDA:-0}")" ]] \
      && (cd /tmp && python -c "import noam_ext._C" 2>/dev/null); then
    return 0
  fi
  if [[ "${NOAM_EXT_NO_CUDA:-0}" != "1" ]] && cuda_buildable; then
    install_noam_ext NOAM_EXT_FORCE_CUDA=1
  else
    install_noam_ext NOAM_EXT_NO_CUDA=1
  fi
}

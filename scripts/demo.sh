#!/usr/bin/env bash
# Installs what is needed and runs noam_ext's demonstration. Extra arguments go to the demo.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$REPO_ROOT"
ensure_noam_ext
export NOAM_EXT_DEMO_OUT="${NOAM_EXT_DEMO_OUT:-$REPO_ROOT/demo_out}"
cd "$REPO_ROOT/scripts"  # import the installed package, not the source folder
python -m noam_ext.train_demo "$@"

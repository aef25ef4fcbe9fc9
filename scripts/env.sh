#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and activate it. Source it: `source scripts/env.sh`.
# The venv is cached per hash of requirements.txt, so a second run costs seconds. It holds third-party
# packages only: nothing of this project is installed into it (it may serve several checkouts), and
# every entry point imports the folders of the checkout it is started from (docs/layout.md, "Which code runs").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
HASH="$(sha256sum < "$ROOT/requirements.txt" | cut -c1-16)"
VENV="${MMOE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/mmoe-trainer/venv-$HASH}"
if [ ! -f "$VENV/.complete" ]; then
    mkdir -p "$(dirname "$VENV")"
    # One builder at a time: a second shell (another checkout, a parallel test run) waits here.
    exec 9>"$VENV.lock"
    flock 9
    if [ ! -f "$VENV/.complete" ]; then
        echo "[env] creating $VENV (first run: a few minutes)" >&2
        rm -rf "$VENV"
        "$PY" -m venv "$VENV"
        "$VENV/bin/python" -m pip install -q --upgrade pip
        (cd "$ROOT" && DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install -q -r requirements.txt)
        touch "$VENV/.complete"
    fi
    flock -u 9
    exec 9>&-
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
# DeepSpeed's JIT-built ops, if any op is ever built, are cached here (its CPU shared-memory op is not
# loaded at all: model/distributed.py, skip_deepspeed_shm_op).
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mmoe-trainer/torch_extensions}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
set +euo pipefail

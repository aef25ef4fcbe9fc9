#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and activate it. Source it: `source scripts/env.sh`.
# The venv is cached per hash of requirements.txt, so a second run costs seconds. It holds third-party
# packages only: nothing of this project is installed into it (it may serve several checkouts), and
# every entry point imports the folders of the checkout it is started from (README, "Layout").
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
# DeepSpeed's JIT-built ops (the CPU shared-memory op, ~60 s to build) are cached here.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mmoe-trainer/torch_extensions}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
# Build DeepSpeed's CPU shared-memory op once (about 90 s on 2 cores) so that no training or test
# run pays for it; CUDA machines do not use it.
if ! ls "$TORCH_EXTENSIONS_DIR"/deepspeed_shm_comm/*.so >/dev/null 2>&1 && ! python -c "import torch,sys; sys.exit(not torch.cuda.is_available())"; then
    echo "[env] building DeepSpeed's CPU communication op (once)" >&2
    python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null 2>&1 || echo "[env] warning: op build failed; DeepSpeed will retry at run time" >&2
fi
set +euo pipefail

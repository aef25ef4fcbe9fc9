#!/usr/bin/env bash
# The project's test command: sets up the environment, lints, runs the whole suite (tests/unit and
# tests/integration) on several pytest-xdist workers: one per core, at most 4 (MMOE_TEST_WORKERS overrides;
# 0 runs in this process). Extra arguments go to pytest. Fails when a test fails, and also when no test was
# collected (pytest exit code 5).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh" || exit 1
cd "$ROOT"
ruff check . || { echo "ruff found problems" >&2; exit 1; }
workers="${MMOE_TEST_WORKERS:-$(( $(nproc) < 4 ? $(nproc) : 4 ))}"
# loadgroup: tests go to whichever worker is free, except a module marked xdist_group (an expensive module
# fixture: a SLURM cluster, a reference run), which runs whole on one worker.
python -m pytest -n "$workers" --dist loadgroup "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: treating that as a failure" >&2
    exit 1
fi
exit "$rc"

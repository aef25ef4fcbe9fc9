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
# Each test goes to whichever worker is free. (pytest-xdist's loadgroup, which would keep a module with an
# expensive module fixture on one worker, renames node ids through an attribute pytest 9 no longer reads: it
# groups nothing. Such a fixture is built once on each worker that runs a test of its module.)
python -m pytest -n "$workers" --dist load "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: treating that as a failure" >&2
    exit 1
fi
exit "$rc"

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
# --dist loadgroup with no test marked: one test at a time to whichever worker is free. (--dist load hands out
# batches up front and left one worker alone with the last 3 minutes of tests: 1,224 s against 1,030 s here.
# loadgroup's grouping itself does nothing under pytest 9: it renames node ids through an attribute pytest 9
# no longer reads; so a module fixture is built once on each worker that runs a test of its module.)
python -m pytest -n "$workers" --dist loadgroup "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: treating that as a failure" >&2
    exit 1
fi
exit "$rc"

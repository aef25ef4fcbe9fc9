#!/usr/bin/env bash
# The project's test command: sets up the environment, lints, runs the whole suite.
# Fails when a test fails, and also when no test was collected (pytest exit code 5).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh" || exit 1
cd "$ROOT"
ruff check . || { echo "ruff found problems" >&2; exit 1; }
python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: treating that as a failure" >&2
    exit 1
fi
exit "$rc"

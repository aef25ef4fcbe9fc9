"""core/faults.py is the one reader of the MMOE_TEST_* hooks, and documents every hook the tests set."""

import os
import signal
import subprocess
import sys

import pytest

from tests.support.helpers import ROOT


@pytest.mark.parametrize(("env", "call", "died_of"), [
    ({"MMOE_TEST_KILL_AT_STEP": "5"}, "faults.kill_point('KILL_AT_STEP', 5)", signal.SIGKILL),
    ({"MMOE_TEST_KILL_IN_EXPORT_SWAP": "1"}, "faults.kill_point('KILL_IN_EXPORT_SWAP')", signal.SIGKILL),
    ({"MMOE_TEST_SIGNAL_AT_STEP": "2"}, "faults.signal_point('SIGNAL_AT_STEP', 2)", signal.SIGUSR1),
    ({"MMOE_TEST_RANK_FAULT": "kill:1:3"}, "faults.rank_fault(3, 1)", signal.SIGKILL),
])
def test_a_hook_set_for_this_point_fires(env, call, died_of):
    code = f"from core import faults; {call}; print('survived')"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == -died_of and "survived" not in done.stdout, (done.returncode, done.stderr)

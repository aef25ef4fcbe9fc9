"""Preemption and failed ranks, end to end on the tiny preset (CPU, gloo): a stop signal becomes a complete
checkpoint at the next optimizer step and exit code 75, the resumed run is the uninterrupted one, a dead or
hung rank ends the job within train.collective_timeout_s with one line naming it (train/preemption.py,
launch/train.py)."""

from __future__ import annotations

import pytest

from model.config import ConfigError, load_config
from tests.support.runs import TINY
from train.preemption import launcher_ancestors


def test_stop_signals_are_checked_and_a_plain_process_watches_no_launcher():
    assert load_config(TINY, ["train.stop_signals=[SIGUSR2]"]).train.stop_signals == ["SIGUSR2"]
    with pytest.raises(ConfigError, match=r"train.stop_signals: 'SIGKILL' is not one of"):
        load_config(TINY, ["train.stop_signals=[SIGKILL]"])
    with pytest.raises(ConfigError, match=r"train.collective_timeout_s: must be >= 1"):
        load_config(TINY, ["train.collective_timeout_s=0"])
    assert launcher_ancestors() == []  # pytest is not a launcher: a plain run stops on signals only

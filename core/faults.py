"""Fault injection for the tests: the one module that reads the ``MMOE_TEST_*`` environment variables.

The multi-process tests set these in the environment of the processes they start; unset (as in every real
run), each hook does nothing. A call site names a hook without its ``MMOE_TEST_`` prefix, e.g.
``faults.kill_point("KILL_AT_STEP", step)``; an unknown name is a ValueError, not a hook that never fires.

Hooks (variable=value: what happens, where; the tests that use it):

- ``MMOE_TEST_KILL_DURING_SAVE=STEP``: SIGKILL on every rank once all files of the step-STEP checkpoint are
  written, before its complete.json (train/checkpointing.py save); test_trainer.py, test_preemption.py.
- ``MMOE_TEST_KILL_AT_STEP=STEP``: SIGKILL on every rank right after the step-STEP checkpoint is saved
  (train/trainer.py); test_trainer.py, test_negatives.py, test_expert_parallel.py.
- ``MMOE_TEST_KILL_IN_EXPORT_SWAP=1``: SIGKILL between the two renames that swap a new export in
  (model/export.py save_export); test_faults.py.
- ``MMOE_TEST_SIGNAL_AT_STEP=STEP``: rank 0 sends itself SIGUSR1 (a scheduler's stop signal) at the end of
  step STEP (train/trainer.py); test_preemption.py, test_resume_elsewhere.py.
- ``MMOE_TEST_SIGNAL_IN_EVAL=STEP``: rank 0 sends itself SIGUSR1 at the stop checks of an evaluation or of
  mining during step STEP (train/trainer.py _stop_requested); test_preemption.py.
- ``MMOE_TEST_NAN_LOSS_AT_STEP=STEP``: the loss of optimizer step STEP becomes NaN (train/trainer.py);
  test_faults.py.
- ``MMOE_TEST_RANK_FAULT=kill:RANK:STEP`` or ``hang:RANK:STEP``: rank RANK is SIGKILLed, or sleeps for an
  hour, in the middle of optimizer step STEP (train/trainer.py, :func:`rank_fault`); test_preemption.py.
- ``MMOE_TEST_DUMP_STATE=1``: every rank writes its own weights to ``state-rankR.pt`` in each checkpoint
  folder (train/checkpointing.py), to compare ranks; test_faults.py, test_expert_parallel.py.
- ``MMOE_TEST_DUMP_FULL=1``: every rank writes its share of the whole state as saved and as loaded
  (``saved-STEP-rankR.pt``, ``loaded-STEP-rankR.pt`` beside the checkpoints; train/checkpoint_manager.py);
  test_resume_elsewhere.py.
- ``MMOE_TEST_DUMP_LOADED=1``: every rank writes its weights and optimizer state right after a resume
  (``loaded-rankR.pt``; train/checkpoint_manager.py); test_resume_elsewhere.py.
"""

from __future__ import annotations

import os
import signal
import time

PREFIX = "MMOE_TEST_"
HOOKS = frozenset({"KILL_DURING_SAVE", "KILL_AT_STEP", "KILL_IN_EXPORT_SWAP", "SIGNAL_AT_STEP", "SIGNAL_IN_EVAL",
                   "NAN_LOSS_AT_STEP", "RANK_FAULT", "DUMP_STATE", "DUMP_FULL", "DUMP_LOADED"})


def _value(name: str) -> str | None:
    if name not in HOOKS:
        raise ValueError(f"unknown fault hook {name!r} (core/faults.py lists them: {', '.join(sorted(HOOKS))})")
    return os.environ.get(PREFIX + name)


def enabled(name: str) -> bool:
    """Whether hook ``name`` is set (to anything non-empty)."""
    return bool(_value(name))


def flag(name: str) -> int | None:
    """The integer hook ``name`` is set to, or None."""
    value = _value(name)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{PREFIX}{name}={value!r} is not an integer") from None


def kill_point(name: str, step: int | None = None) -> None:
    """SIGKILL this process if hook ``name`` is set to ``step`` (``step`` None: set at all)."""
    value = _value(name)
    if value if step is None else value == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def signal_point(name: str, step: int) -> None:
    """Send this process SIGUSR1 (a scheduler's stop signal) if hook ``name`` is set to ``step``."""
    if flag(name) == step:
        os.kill(os.getpid(), signal.SIGUSR1)


def rank_fault(step: int, rank: int) -> None:
    """``RANK_FAULT=kill:RANK:STEP`` or ``hang:RANK:STEP``: SIGKILL, or sleep for an hour, when this
    process is that rank in that step."""
    spec = _value("RANK_FAULT")
    if not spec:
        return
    what, who, when = _rank_fault_spec(spec)
    if who == rank and when == step:
        if what == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(3600)


def _rank_fault_spec(spec: str) -> tuple[str, int, int]:
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] not in ("kill", "hang") or not all(p.isdecimal() for p in parts[1:]):
        raise ValueError(f"{PREFIX}RANK_FAULT={spec!r}: expected kill:RANK:STEP or hang:RANK:STEP")
    return parts[0], int(parts[1]), int(parts[2])

"""core/faults.py is the one reader of the MMOE_TEST_* hooks, and documents every hook the tests set."""

import re

import pytest

from core import faults
from tests.support.helpers import ROOT

PRODUCTION = ("core", "moe", "data_shards", "model", "eval", "train", "launch", "bench")


def test_no_production_module_but_the_hook_module_names_a_hook_variable():
    readers = [str(p.relative_to(ROOT)) for folder in PRODUCTION for p in (ROOT / folder).rglob("*.py")
               if faults.PREFIX in p.read_text() and p != ROOT / "core" / "faults.py"]
    assert not readers, readers


def test_every_hook_the_tests_set_is_known_and_documented():
    used = {m for p in (ROOT / "tests").rglob("*.py") for m in re.findall(r"MMOE_TEST_([A-Z_]+)", p.read_text())}
    assert used <= faults.HOOKS, used - faults.HOOKS
    assert all(f"``{faults.PREFIX}{name}" in faults.__doc__ for name in faults.HOOKS)


def test_hooks_read_the_environment_and_refuse_unknown_names(monkeypatch):
    monkeypatch.delenv("MMOE_TEST_NAN_LOSS_AT_STEP", raising=False)
    assert faults.flag("NAN_LOSS_AT_STEP") is None and not faults.enabled("NAN_LOSS_AT_STEP")
    monkeypatch.setenv("MMOE_TEST_NAN_LOSS_AT_STEP", "3")
    assert faults.flag("NAN_LOSS_AT_STEP") == 3 and faults.enabled("NAN_LOSS_AT_STEP")
    monkeypatch.setenv("MMOE_TEST_KILL_AT_STEP", "5")
    faults.kill_point("KILL_AT_STEP", 4)  # another step: nothing happens
    monkeypatch.setenv("MMOE_TEST_RANK_FAULT", "kill:1:3")
    faults.rank_fault(3, 0)  # another rank
    with pytest.raises(ValueError, match="unknown fault hook"):
        faults.flag("NAN_LOSS")


@pytest.mark.parametrize("spec", ["kill:1", "kill:1:3:4", "kil:1:3", "hang:one:3", "kill:1:"])
def test_a_malformed_rank_fault_is_an_error_naming_the_expected_form(monkeypatch, spec):
    monkeypatch.setenv("MMOE_TEST_RANK_FAULT", spec)
    with pytest.raises(ValueError, match=r"MMOE_TEST_RANK_FAULT=.*expected kill:RANK:STEP or hang:RANK:STEP"):
        faults.rank_fault(3, 1)


def test_a_step_hook_that_is_not_an_integer_is_an_error_naming_it(monkeypatch):
    monkeypatch.setenv("MMOE_TEST_SIGNAL_AT_STEP", "three")
    with pytest.raises(ValueError, match=r"MMOE_TEST_SIGNAL_AT_STEP='three' is not an integer"):
        faults.signal_point("SIGNAL_AT_STEP", 3)

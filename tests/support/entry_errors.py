"""Shared by tests/unit/test_entry_errors.py and tests/integration/test_entry_errors.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SENTENCE, MENTION = "Kemor Fubrul was seen at the harbour", "Kemor Fubrul"


def exit_line(fn, argv: list[str]) -> str:
    """The one-line message a command's main() exits with."""
    with pytest.raises(SystemExit) as info:
        fn(argv)
    msg = str(info.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


@pytest.fixture
def export_copy(tiny_export, tmp_path) -> Path:
    out = tmp_path / "best"
    shutil.copytree(tiny_export, out)
    return out

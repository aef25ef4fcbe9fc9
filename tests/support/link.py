"""Shared by tests/unit/test_link.py and tests/integration/test_link.py."""

import shutil

import pytest

SENTENCE, MENTION, DESC = "Photo: kalo mirezu at the market.", "kalo mirezu", "a famous painter from somewhere"


@pytest.fixture
def own_export(tiny_export, tmp_path):
    """A private copy of the tiny_export, so the KB cache written next to it starts absent."""
    return shutil.copytree(tiny_export, tmp_path / "best", ignore=shutil.ignore_patterns("kb_cache-*"))

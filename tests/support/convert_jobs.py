"""Shared by tests/unit/test_convert_jobs.py and tests/integration/test_convert_jobs.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from data_shards.convert import ConvertSettings

SETTINGS = ConvertSettings(image_size=32, shard_size=29, workers=1)  # as tests/conftest.py's tiny_shards


def _tree(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``folder`` (manifest, shards, kb/index.npy, tokenizer)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_same_conversion(merged: Path, one_job: Path) -> None:
    # The manifest has no timing fields and the merge adds none about how it was made, so even manifest.json
    # (whose sha256 checkpoints record) is byte-identical; the whole trees are compared.
    assert _tree(merged) == _tree(one_job)
    assert json.loads((merged / "manifest.json").read_text()) == json.loads((one_job / "manifest.json").read_text())


@pytest.fixture(scope="session")
def raw(tiny_raw) -> Path:
    """The tiny benchmark's raw files (read-only: the tests that change them copy them first)."""
    return tiny_raw


@pytest.fixture(scope="session")
def one_job(tiny_shards) -> Path:
    """``raw`` converted in one job with SETTINGS: that is tests/conftest.py's tiny_shards (read-only)."""
    return tiny_shards

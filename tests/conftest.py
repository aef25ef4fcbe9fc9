"""Session fixtures: the tiny synthetic benchmark, generated and converted once."""

from pathlib import Path

import pytest

from data_shards.convert import ConvertSettings, convert
from data_shards.synthetic import generate, preset


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate(root / "raw", preset("tiny"), workers=1, progress=False)
    convert("synthetic", root / "raw", root / "shards", ConvertSettings(image_size=32, shard_size=29, workers=1))
    return root / "shards"

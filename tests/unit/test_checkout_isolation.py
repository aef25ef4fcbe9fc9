"""Every entry point runs the code of the checkout it is started from, never another checkout's.

Two copies of the repository side by side share one virtualenv (this process's interpreter); each
gets a marker module with its own text, and every entry point started in a copy must import that
copy's marker.
"""

import sys
from pathlib import Path


def test_nothing_of_the_project_is_installed_in_the_environment():
    import importlib.metadata as md

    site = [Path(p) for p in sys.path if p.endswith("site-packages")]
    installed = {d.metadata["Name"].lower() for s in site for d in md.distributions(path=[str(s)])}
    assert "mmoe-trainer" not in installed
    for package in ("train", "eval", "moe", "launch", "bench", "data_shards"):
        for s in site:
            assert not (s / package).exists(), f"{package} is installed in {s}"

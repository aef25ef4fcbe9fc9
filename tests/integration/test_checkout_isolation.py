"""Every entry point runs the code of the checkout it is started from, never another checkout's.

Two copies of the repository side by side share one virtualenv (this process's interpreter); each
gets a marker module with its own text, and every entry point started in a copy must import that
copy's marker.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.helpers import ROOT

MARKER = "import sys\nprint('checkout-marker: {name}', file=sys.stderr)\n"


def copy_checkout(dest: Path, name: str) -> Path:
    listing = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]  # the checkout, not its data
    tracked = subprocess.run(listing, cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for rel in filter(None, (t.decode() for t in tracked)):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    # The marker runs whenever the copy's core package (the bottom of the stack, under every entry point) is imported.
    init = dest / "core" / "__init__.py"
    init.write_text(init.read_text() + "\n" + MARKER.format(name=name))
    return dest


@pytest.fixture(scope="module")
def checkouts(tmp_path_factory):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    base = tmp_path_factory.mktemp("checkouts")
    return {name: copy_checkout(base / name, name) for name in ("a", "b")}


@pytest.mark.parametrize("entry", [["launch/train.py", "--help"], ["-m", "eval.evaluate", "--help"],
                                   ["-m", "model.published_checkpoint", "--help"], ["-m", "train.checkpointing", "--help"]])
def test_each_checkout_runs_its_own_code(checkouts, entry):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for name, root in checkouts.items():
        proc = subprocess.run([sys.executable, *entry], cwd=root, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"checkout-marker: {name}" in proc.stderr, f"{entry} in checkout {name} ran other code: {proc.stderr[-500:]}"
        other = "b" if name == "a" else "a"
        assert f"checkout-marker: {other}" not in proc.stderr


def test_launch_script_runs_its_checkout_from_any_directory(checkouts, tmp_path):
    """`deepspeed launch/train.py` may be started from elsewhere: the script's checkout still wins."""
    proc = subprocess.run([sys.executable, str(checkouts["b"] / "launch" / "train.py"), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "checkout-marker: b" in proc.stderr

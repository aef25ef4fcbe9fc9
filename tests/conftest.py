"""Session fixtures: the tiny synthetic benchmark (generated and converted once) and a random-init
model export on it; one thread per pytest-xdist worker."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from data_shards.collate import load_tokenizer
from data_shards.convert import ConvertSettings, convert
from data_shards.synthetic import generate, preset
from model.config import Config, DataConfig, EvalConfig
from model.export import save_export
from model.mmoe import build_model
from tests.support.helpers import tiny_model_config

# Fixtures that a topic's unit and integration tests share live beside its helpers in tests/support/.
pytest_plugins = [
    "tests.support.audit",
    "tests.support.convert_jobs",
    "tests.support.data_faults",
    "tests.support.dme",
    "tests.support.entry_errors",
    "tests.support.link",
    "tests.support.towers",
]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The workers share the cores (scripts/test.sh starts one per core): one thread each, and one for every
    # process they start. Torch's default, a thread per core, has its threads spin against the other
    # workers' processes (a 2.5 s ranking test took 35 s).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory) -> Path:
    """The tiny synthetic benchmark's raw files (read-only: copy it before changing anything)."""
    root = tmp_path_factory.mktemp("synthetic") / "raw"
    generate(root, preset("tiny"), workers=1, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_shards(tiny_raw) -> Path:
    """The tiny benchmark converted to shards, beside its raw files (``tiny_shards.parent / "raw"``; read-only)."""
    out = tiny_raw.parent / "shards"
    convert("synthetic", tiny_raw, out, ConvertSettings(image_size=32, shard_size=29, workers=1))
    return out


@pytest.fixture(scope="session")
def tiny_export(tiny_shards, tmp_path_factory) -> Path:
    """A seeded random-init tiny model exported as runs/NAME/best would be (read-only: copy it
    before writing next to it)."""
    cfg = tiny_model_config()
    tiny = cfg.tiny_clip
    tiny.vocab_size, tiny.bos_token_id, tiny.eos_token_id, tiny.pad_token_id = 0, -1, -1, -1  # from the tokenizer
    config = Config(model=cfg, data=DataConfig(shards=str(tiny_shards), num_workers=0),
                    eval=EvalConfig(batch_size=32, num_workers=0, mention_chunk=16))
    config.negatives.top_k = 10
    torch.manual_seed(0)
    model, resolved = build_model(config, load_tokenizer(tiny_shards / "tokenizer"))
    return save_export(model, resolved, tmp_path_factory.mktemp("ckpt") / "best")


@pytest.fixture
def small_disk(tmp_path):
    """``mount(kib)``: a tmpfs of that size (a disk that fills); skipped where mounting is not permitted."""
    mounts: list[Path] = []

    def mount(kib: int) -> Path:
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount command: cannot make a small disk to fill")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(where)], capture_output=True,
                              text=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a small tmpfs to fill (needs root with CAP_SYS_ADMIN): {proc.stderr.strip()}")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)

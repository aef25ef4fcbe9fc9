"""Tiny model configs and random batches shared by the tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import torch

from model.config import ModelConfig
from model.encoder import TinyClipSettings
from moe.matcher import MatcherSettings
from moe.units import MoESettings

ROOT = Path(__file__).resolve().parents[2]  # the checkout
TEXT_LEN = 17  # equals the tiny CLIP's image token count (4x4 patches + CLS)


def tiny_model_config(compat: str = "none", top_k: int = 2, num_experts: int = 4, **moe_kw) -> ModelConfig:
    clip = TinyClipSettings(vocab_size=100, bos_token_id=98, eos_token_id=99, pad_token_id=0, text_hidden=32,
                            vision_hidden=32, layers=1, heads=2, image_size=32, patch_size=8, projection_dim=24,
                            max_text_positions=32, seed=0)
    moe = MoESettings(num_experts=num_experts, top_k=top_k, min_capacity=1, **moe_kw)
    matcher = MatcherSettings(text_dim=24, image_dim=16, hidden=16, cross_dim=16, compat=compat, moe=moe)
    return ModelConfig(tiny_clip=clip, text_max_length=TEXT_LEN, matcher=matcher)


def random_batch(n: int, seed: int, text_len: int = TEXT_LEN, image_size: int = 32, missing: tuple[int, ...] = ()) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, text_len + 1, (n,), generator=g)
    ids = torch.randint(1, 98, (n, text_len), generator=g)
    mask = torch.arange(text_len)[None, :] < lengths[:, None]
    ids[:, 0] = 98
    ids[torch.arange(n), lengths - 1] = 99  # eos at the end of each text
    ids = ids.masked_fill(~mask, 0)
    image_mask = torch.ones(n, dtype=torch.bool)
    image_mask[list(missing)] = False
    return {
        "input_ids": ids,
        "attention_mask": mask.long(),
        "pixel_values": torch.randn(n, 3, image_size, image_size, generator=g),
        "image_mask": image_mask,
    }


def take(batch: dict, rows) -> dict:
    return {k: v[rows] for k, v in batch.items()}


def free_port() -> int:
    """A TCP port free right now, so concurrent test runs on one machine do not collide."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_bounded(cmd: list[str], timeout: float, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` in a session of its own, bounded by ``timeout``.

    Past the limit every process of the session (a launcher, its ranks, their DataLoader workers) gets SIGABRT,
    on which Python's faulthandler (switched on here) prints each thread's stack, then SIGKILL: the failure says
    where the job hung, and no orphaned rank keeps running to slow the tests after it."""
    env = dict(os.environ if env is None else env, PYTHONFAULTHANDLER="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _signal_session(proc, signal.SIGABRT)
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            out, err = "", "(no stacks within 15 s of SIGABRT)"
        raise AssertionError(f"{' '.join(map(str, cmd))} ran past {timeout:.0f} s; the stacks of its processes:\n"
                             f"{err[-12000:]}\n--- stdout ---\n{out[-3000:]}") from None
    finally:
        _signal_session(proc, signal.SIGKILL)
        proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _signal_session(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass

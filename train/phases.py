"""Where a run's wall time goes, and how busy training keeps the machine.

``PhaseClock`` books every second of a training process to one phase: ``setup`` (process group, model,
data checks, engine, resume), ``train`` (the steps and their data loading), ``mining`` (hard negatives),
``dev_eval``, ``test_eval`` and ``checkpoint`` (checkpoints and best-model exports). The totals of
earlier processes of the same run (a resumed run) come from the checkpoint and are added.

``matmul_gflops`` measures the fp32 (or bf16) matmul rate of one process, all ranks at once so that ranks
sharing a machine's cores measure their share; ``count_flops`` counts the FLOPs of one forward and
backward with torch's FlopCounterMode (matmuls, convolutions, attention: what the rate is measured on).
The training throughput is then also a fraction of the measured rate:
``samples/s x FLOPs per sample / sum over ranks of the measured rate``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from model import distributed as D

PHASES = ("setup", "train", "mining", "dev_eval", "test_eval", "checkpoint")


class PhaseClock:
    """Wall seconds per phase; exactly one phase runs at a time (``setup`` from the clock's creation)."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)  # this process
        self.earlier = dict.fromkeys(PHASES, 0.0)  # the processes this run resumed from
        self.current = "setup"
        self._since = time.perf_counter()

    def switch(self, phase: str) -> str:
        """End the current phase, start ``phase``; returns the phase that was running."""
        if phase not in self.seconds:
            raise ValueError(f"unknown phase {phase!r} (one of {', '.join(PHASES)})")
        now = time.perf_counter()
        self.seconds[self.current] += now - self._since
        previous, self.current, self._since = self.current, phase, now
        return previous

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Book the block to ``name``, then go back to the phase that was running."""
        previous = self.switch(name)
        try:
            yield
        finally:
            self.switch(previous)

    def resume_from(self, saved: dict[str, float] | None) -> None:
        """Add the totals a checkpoint carries (the run's earlier processes)."""
        for k, v in (saved or {}).items():
            if k in self.earlier:
                self.earlier[k] = float(v)

    def totals(self) -> dict[str, float]:
        """Seconds per phase over the whole run, up to now (the running phase included)."""
        out = {k: self.earlier[k] + self.seconds[k] for k in PHASES}
        out[self.current] += time.perf_counter() - self._since
        return out

    def metrics(self) -> dict[str, float]:
        """``time/<phase>_s`` and ``time/total_s`` over the whole run, for metrics.jsonl and W&B."""
        t = self.totals()
        return {f"time/{k}_s": v for k, v in t.items()} | {"time/total_s": sum(t.values())}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None,
                  rounds: int = 3, repeats: int = 2) -> float:
    """This process's matmul rate in GFLOP/s: the best of ``rounds`` rounds of ``repeats`` square matmuls
    (n = 1024 on CPU, 8192 on GPU, with this process's threads)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up (kernel selection, page faults)
    best = float("inf")
    for _ in range(rounds):
        _sync(device)
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - t) / repeats)
    return 2.0 * n**3 / best / 1e9


def count_flops(step: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``step`` (a forward and backward) under FlopCounterMode: its result and the FLOPs it took."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = step()
    return out, float(counter.get_total_flops())


def throughput_line(totals: dict[str, float], samples_per_s: float | None, fraction: float | None,
                    rate_gflops: float | None) -> str:
    """One console line: the seconds of each phase, the total, and the training throughput."""
    names = {"dev_eval": "dev evaluation", "test_eval": "test evaluation", "checkpoint": "checkpoints"}
    parts = [f"{names.get(k, k)} {v:.1f}s" for k, v in totals.items() if v > 0.05 or k == "train"]
    line = "[time] " + ", ".join(parts) + f"; total {sum(totals.values()):.1f}s"
    if samples_per_s is not None:
        line += f"; training {samples_per_s:,.1f} samples/s"
        if fraction is not None and rate_gflops:
            line += f" = {100 * fraction:.1f}% of the matmul rate measured at the start ({rate_gflops:,.0f} GFLOP/s)"
    return line


def throughput_report(clock: PhaseClock, rows_trained: int, samples_trained: int, flops_per_row: float | None,
                      matmul_rate: float, device: torch.device) -> tuple[dict[str, float], str]:
    """The run's seconds per phase and this process's training throughput (samples/s and the fraction of the
    matmul rate measured at the start, ``matmul_rate`` GFLOP/s): a metrics row and its console line
    (collective). ``rows_trained``: micro-batch rows (padding included), ``samples_trained``: real samples."""
    totals = clock.totals()
    train_s = clock.seconds["train"]  # this process's (a resumed run's earlier steps are not counted)
    achieved = rows_trained * (flops_per_row or 0.0) / max(train_s, 1e-9) / 1e9  # GFLOP/s
    achieved, samples = D.all_reduce_sum(torch.tensor([achieved, float(samples_trained)], dtype=torch.float64,
                                                      device=device)).tolist()
    out = clock.metrics()
    if samples > 0:
        out["throughput/samples_per_s"] = samples / max(train_s, 1e-9)
        out["throughput/matmul_gflops"] = matmul_rate
        out["throughput/flops_per_sample"] = (flops_per_row or 0.0)
        if matmul_rate > 0:
            out["throughput/matmul_fraction"] = achieved / matmul_rate
    return out, throughput_line(totals, out.get("throughput/samples_per_s"), out.get("throughput/matmul_fraction"),
                                matmul_rate)

"""Bad steps: a non-finite loss or gradient norm on any rank skips the optimizer step (``GuardedAdamW`` leaves
the weights and its state alone), is counted, and beyond train.max_bad_steps ends training (``TrainingDiverged``).

``StepGuard`` is what the trainer calls around each optimizer step: ``note_loss`` per micro-batch, ``before_step``
at the gradient-accumulation boundary (the one all-reduce of the step that agrees on a finite loss and on a stop
request, ``agree``), ``check_step`` once the step is taken; ``last_grad_norm`` for the metrics row."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from model import distributed as D
from model.config import Config
from moe.expert_parallel import global_grad_norm
from train.observe import RankLog, RunLog
from train.state import TrainState


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm beyond train.max_bad_steps (reported without a traceback)."""


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that leaves the weights and its own state untouched on a bad step.

    The step is skipped when the trainer asks for it (``skip_next``: a non-finite loss) or when any
    gradient it holds is non-finite on any rank. DeepSpeed calls this step once per optimizer step
    on every rank, whatever the path (plain fp32, ZeRO 1/2 partitions, bf16 master weights), after
    its own clipping (a NaN norm makes every clipped gradient NaN), so the decision, all-reduced
    over the world, is the same everywhere and no NaN ever reaches a weight."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.skip_next = False
        self.skipped_last = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        device = D.device_for_rank()
        bad = torch.tensor([1.0 if self.skip_next else 0.0], device=device)
        if grads:
            bad += (~torch.isfinite(torch.nn.utils.get_total_norm(grads))).float().to(device)
        if D.world() > 1:
            dist.all_reduce(bad)
        self.skip_next = False
        self.skipped_last = bool(bad.item() > 0)
        if self.skipped_last:
            return None
        return super().step(closure)


def agree(ok: bool, stop_code: int, device: torch.device) -> tuple[bool, int]:
    """One reduction per optimizer step: whether ``ok`` (a finite loss) holds on every rank, and the
    largest stop code of any rank (0: nobody was asked to stop)."""
    if D.world() == 1:
        return ok, stop_code
    t = torch.tensor([0.0 if ok else 1.0, float(stop_code)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t[0].item() == 0, int(t[1].item())


class StepGuard:
    def __init__(self, engine, optimizer: GuardedAdamW, cfg: Config, precision: str, device: torch.device,
                 log: RunLog, console: RankLog) -> None:
        """``optimizer``: the client optimizer inside DeepSpeed's wrappers (it skips bad steps);
        ``precision``: the resolved one (fp32, bf16, fp16)."""
        self.engine, self.optimizer, self.cfg, self.precision, self.device = engine, optimizer, cfg, precision, device
        self.log, self.console = log, console
        self.grad_norm: float | None = None
        self._loss_finite = True  # every micro-batch of the current optimizer step had a finite loss

    def note_loss(self, loss: torch.Tensor) -> None:
        """Per micro-batch, before its backward."""
        self._loss_finite &= bool(torch.isfinite(loss))

    def before_step(self, local_stop_code: Callable[[], int]) -> int:
        """At the gradient-accumulation boundary, after the backward and before ``engine.step()`` (collective):
        the gradient norm, the agreement of every rank on a finite loss and on a stop request, the optimizer
        told to skip a bad step. ``local_stop_code``: this rank's (StopRequests.local_code); returns the agreed one."""
        self.grad_norm = self._grad_norm_before_step()
        self._loss_finite, stop_code = agree(self._loss_finite, local_stop_code(), self.device)
        self.optimizer.skip_next, self.optimizer.skipped_last = not self._loss_finite, False
        return stop_code

    def check_step(self, state: TrainState, step_parts: dict[str, float]) -> bool:
        """After an optimizer step: True if it was applied. A bad step (non-finite loss or gradient
        norm on any rank; GuardedAdamW left the weights alone) is counted; beyond
        train.max_bad_steps, training stops with TrainingDiverged."""
        loss_finite, self._loss_finite = self._loss_finite, True
        norm = self.last_grad_norm()
        norm = float(norm) if norm is not None else None
        # fp16: an overflow is DeepSpeed's loss-scale business (it skips the step and lowers the scale)
        norm_ok = norm is None or math.isfinite(norm) or self.precision == "fp16"
        if loss_finite and norm_ok and not self.optimizer.skipped_last:
            return True
        st, allowed = state, self.cfg.train.max_bad_steps
        st.bad_steps += 1
        loss = step_parts.get("loss", float("nan"))
        what = f"loss {loss:.4g}, gradient norm {norm if norm is not None else 'unknown'}"
        self.log.log(st.step, {"train/bad_steps": st.bad_steps})
        if st.bad_steps > allowed:
            raise TrainingDiverged(
                f"training diverged at step {st.step}: non-finite loss or gradient norm ({what}; bad steps "
                f"{st.bad_steps}, train.max_bad_steps={allowed}); the update was not applied, no checkpoint or "
                f"export was written for this step. Lower train.lr ({self.cfg.train.lr:g}) or check the data, "
                "then resume from the last checkpoint (--resume auto) or start afresh")
        self.console.warn(f"[train] step {st.step}: non-finite loss or gradient norm ({what}): update skipped "
                          f"(bad step {st.bad_steps} of train.max_bad_steps={allowed})")
        return False

    def _grad_norm_before_step(self) -> float | None:
        """DeepSpeed reports the global gradient norm for its own optimizer wrappers (ZeRO, bf16,
        fp16) but not for a plain fp32 client optimizer; measure it there (pre-clipping)."""
        if self.engine.zero_optimization() or self.precision != "fp32":
            return None
        return global_grad_norm(self.engine.module, self.device, D.world())

    def last_grad_norm(self) -> float | None:
        """The last optimizer step's global gradient norm: ours (plain fp32) or DeepSpeed's."""
        return self.grad_norm if self.grad_norm is not None else self.engine.get_global_grad_norm()

"""The DeepSpeed training loop: stream -> model -> loss -> engine step, dev evaluation with early
stopping on MRR, resumable checkpoints, best-model export, test evaluation and leaderboard."""

from __future__ import annotations

import atexit
import errno
import logging
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from core import faults
from core.cli import disk_full
from data_shards.collate import load_tokenizer
from data_shards.folder import ShardFolder
from data_shards.store import ShardError
from data_shards.stream import TrainStream, make_loader
from eval import evaluate as ev
from eval.encode import Interrupted
from eval.evaluate import EvalResult, evaluate_split, one_line, write_outputs
from model import distributed as D
from model.config import Config, save_config
from model.export import ExportTargetError, load_export, recover_export, save_export
from model.factory import make_collator, resolve_tokenizer
from model.mmoe import BATCH_KEYS, build_model
from moe.expert_parallel import global_grad_norm, local_experts
from moe.layer_spec import check_ep_world
from train import checkpointing as ckpt
from train.checkpoint_manager import CheckpointManager, RunSetupError
from train.loss import contrastive_loss
from train.negatives import load_table, mine, save_table
from train.observe import MetricsWindow, RankLog, RunLog
from train.optim_groups import freeze, frozen_towers, group_lr_factors, lr_metrics, param_groups
from train.phases import PhaseClock, count_flops, matmul_gflops, throughput_line
from train.preemption import PREEMPTED_EXIT_CODE, Preempted, StopRequests, clear_record, describe, write_rate_mb_s, write_record
from train.run_folder import RunFolderError, RunFolderLock, mark, prepare_fresh
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


# train.adamw -> torch.optim.AdamW's implementation; auto is torch's own choice (docs/training-speed.md: fused is
# faster but moved the demo's result, so it is an option)
ADAMW_KWARGS = {"auto": {}, "foreach": {"foreach": True}, "fused": {"fused": True},
                "loop": {"foreach": False, "fused": False}}


def resolve_precision(requested: str) -> str:
    if requested in ("bf16", "fp16") and not torch.cuda.is_available():
        # Our layers compute in fp32 on CPUs (DESIGN: bf16 pays only with AMX); DeepSpeed would then fail deep in
        # a LayerNorm with "mixed dtype (CPU)".
        raise RunSetupError(f"train.precision={requested} needs a GPU; on CPUs train in fp32 (train.precision=auto)")
    if requested != "auto":
        return requested
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def deepspeed_config(cfg: Config, precision: str) -> dict:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,  # our torch AdamW (no fused-kernel build needed)
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: batch[k].to(device, non_blocking=True) for k in BATCH_KEYS}


class Trainer:
    def __init__(self, cfg: Config, resume: str = "none", allow_data_change: bool = False, overwrite: bool = False,
                 break_lock: bool = False, allow_config_change: bool = False) -> None:
        import deepspeed

        self.clock = PhaseClock()  # 'setup' until the first step
        D.share_cpu_threads()
        self.stops = StopRequests(cfg.train.stop_signals)
        self.stops.install()  # first: a stop signal during set-up is honoured at the first step
        D.init_process_group(use_deepspeed=True, timeout_s=cfg.train.collective_timeout_s)
        if not D.is_main():
            logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
        self.device = D.device_for_rank()
        self.console = RankLog(D.is_main())
        seed_everything(cfg.train.seed)
        self.run_dir = Path(cfg.train.out_dir) / cfg.train.run_name
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.lock = RunFolderLock(self.run_dir)
        self._claim_run_folder(resume, overwrite, break_lock)
        tokenizer = load_tokenizer(resolve_tokenizer(cfg))
        check_ep_world(cfg.model.matcher.moe.ep_size, D.world(), error=RunSetupError)
        model, self.cfg = build_model(cfg, tokenizer)
        cfg = self.cfg
        if cfg.train.activation_checkpointing:
            model.encoder.enable_activation_checkpointing()
        model.compile_parts(cfg.train.compile)
        self.folder = ShardFolder.open(cfg.data.shards)  # the shards folder: its manifest read once
        self._check_data(cfg, self.folder)
        self.collator = make_collator(cfg, model)
        self.stream = TrainStream(self.folder, self.collator, cfg.data.batch_size, seed=cfg.data.seed, world=D.world(),
                                  rank=D.rank(), num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer,
                                  fraction=cfg.data.train_fraction, fraction_mode=cfg.data.train_fraction_mode)
        self.batches_per_epoch = self.stream.full_epoch_batches()  # of an epoch started with this layout
        self.epoch_batches = self.batches_per_epoch  # of the current epoch (fewer when it began on other hardware)
        steps_by_epochs = cfg.train.epochs * self.batches_per_epoch // cfg.train.grad_accum
        self.total_steps = min(steps_by_epochs, cfg.train.max_steps) if cfg.train.max_steps > 0 else steps_by_epochs
        self.precision = resolve_precision(cfg.train.precision)
        freeze(model, frozen_towers(cfg))
        groups = param_groups(model, cfg)
        optimizer = GuardedAdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas),
                                 eps=cfg.train.adam_eps, weight_decay=cfg.train.weight_decay,
                                 **ADAMW_KWARGS[cfg.train.adamw])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, group_lr_factors(groups, cfg, self.total_steps))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, self.precision))
        self.grad_norm: float | None = None
        self.guard = optimizer  # the client optimizer inside DeepSpeed's wrappers: skips bad steps
        self._loss_finite = True  # every micro-batch of the current optimizer step had a finite loss
        self._stop_code = 0  # a stop request agreed by every rank at the last step boundary (train/preemption.py)
        self._attached: str | None = None  # negatives table currently attached to the stream
        self.state = TrainState()
        self.checkpoints = CheckpointManager(self.engine, optimizer, self.stream, cfg, self.ckpt_dir, self.console,
                                             self.folder.sha256, self.precision, allow_data_change,
                                             allow_config_change)
        self.resumed = self.checkpoints.resume(resume, self.state)  # complete.json of the checkpoint resumed from
        self.clock.resume_from(self.state.phase_s)
        self.flops_per_row: float | None = None  # of one forward and backward, counted on this process's first batch
        self.rows_trained = 0  # micro-batch rows (padding included) and real samples this process trained on
        self.samples_trained = 0
        rate_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
        self.matmul_rate = D.all_reduce_sum(torch.tensor([matmul_gflops(self.device, rate_dtype)], dtype=torch.float64,
                                                         device=self.device)).item()  # GFLOP/s, all ranks
        self._dev_kb: tuple[int, EvalResult] | None = None  # the last dev evaluation's KB cache, for the test
        if D.is_main():
            save_config(cfg, self.run_dir / "config.yaml")
            clear_record(self.run_dir)
        r = self.resumed
        self.log = RunLog(cfg, self.run_dir, D.is_main(), resume_id=self.state.wandb_id,
                          keep_rows=r.get("metrics_rows") if r else 0, keep_step=self.state.step if r else None)
        self.state.wandb_id = self.log.wandb_id
        self.window = MetricsWindow()  # the training metrics since the last log row
        self.bar: tqdm | None = None  # progress bar of the optimizer steps (rank 0, on a terminal)
        self._announce_grace()

    def _claim_run_folder(self, resume: str, overwrite: bool, break_lock: bool) -> None:
        """Rank 0 takes the run folder's lock, checks that a fresh start destroys nothing (train/run_folder.py)
        and finishes an interrupted best-model swap; every rank gets the verdict (collective)."""
        verdict = None
        if D.is_main():
            try:
                notes = [self.lock.acquire(break_lock)]
                atexit.register(self.lock.release)
                fresh = resume == "none" or (resume == "auto" and ckpt.latest_complete(self.ckpt_dir) is None)
                if fresh:
                    notes.append(prepare_fresh(self.run_dir, resume, overwrite))
                mark(self.run_dir, self.run_dir.name)
                recover_export(self.run_dir / "best")  # a kill in the middle of the last best-model swap
                for note in filter(None, notes):
                    self.console.warn(note)
            except (RunFolderError, OSError) as err:
                verdict = str(err)
        verdict = D.from_main(verdict)
        if verdict:
            self.lock.release()
            raise RunSetupError(verdict)

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train until the epochs, train.max_steps or early stopping end it, then finish the run."""
        try:
            self._train()
            return self._finish()
        except Preempted:
            self.log.finish(exit_code=PREEMPTED_EXIT_CODE, preempted=True)
            raise
        except BaseException:
            self.log.finish(exit_code=1)  # close metrics.jsonl and the W&B run as failed
            raise
        finally:
            self.stops.restore()
            self.lock.release()

    def _train(self) -> None:
        st = self.state
        self.bar = tqdm(total=self.total_steps, initial=st.step, desc="train", unit="step",
                        disable=not D.is_main() or None, dynamic_ncols=True)
        self.window.reset()  # the first window's clock starts with training
        self.clock.switch("train")
        if st.eval_pending:  # due at the step this run resumed from (its stop request came first)
            if not self._evaluate_dev():
                self._preempt(saved=True)  # stopped again in it: the checkpoint resumed from still holds
            st.eval_pending = False
        while st.epoch < self.cfg.train.epochs and not self._should_stop():
            self._negatives_for_epoch()
            self._train_epoch()
        self.bar.close()

    def _train_epoch(self) -> None:
        """From the data position to the end of the epoch, or until training stops."""
        st = self.state
        self.stream.set_position(st.epoch, st.batch, st.epoch_segments)
        self.epoch_batches = self.stream.batches_per_epoch()
        for batch in make_loader(self.stream, self.cfg.data.num_workers):
            stepped = self._train_micro_batch(batch)
            epoch_done = st.batch == self.epoch_batches
            if stepped:
                self._end_step(epoch_done)
                if self._should_log():
                    self._log_window()
                evaluated = self._should_eval(epoch_done)
                if evaluated and self._stop_code:  # a stop came first: evaluate after the resume, not in the grace
                    st.eval_pending, evaluated = True, False
                if evaluated and not self._evaluate_dev():  # a stop signal came in during the evaluation
                    st.eval_pending, evaluated = True, False
                saved = self._should_save(evaluated)
                if saved:
                    self._save()
                    faults.kill_point("KILL_AT_STEP", st.step)
                if self._stop_code:
                    self._preempt(saved)
                if D.is_main():
                    faults.signal_point("SIGNAL_AT_STEP", st.step)  # tests: a scheduler's signal
            if epoch_done or (stepped and self._should_stop()):
                return

    def _finish(self) -> dict:
        """A dev evaluation if there was none, the last checkpoint, the test evaluation; closes the logs."""
        if self.state.best_step < 0 and not self._evaluate_dev():  # never evaluated on dev (a short run): now
            self.state.eval_pending = True  # stopped in it: evaluated after the resume
            self._preempt(saved=False)
        self._save()
        result = {"state": self.state.state_dict()}
        if self.cfg.train.test_at_end:
            res = self._evaluate_test()
            if self._stop_code:  # stopped in it: the final checkpoint is written; the resume evaluates again
                self._preempt(saved=True)
            if res is not None:
                result["test"] = res.metrics
        result["time"] = self._report_time()
        folder = self.log.finish()
        self.console.info(f"run folder: {self.run_dir}")
        if folder:
            self.console.info(f"W&B offline run: {folder} (upload with `wandb sync {folder}`)")
        return result

    def _report_time(self) -> dict[str, float]:
        """The run's seconds per phase and this process's training throughput (samples/s and the fraction of the
        matmul rate measured at the start): a console line and a metrics row (collective)."""
        totals = self.clock.totals()
        train_s = self.clock.seconds["train"]  # this process's (a resumed run's earlier steps are not counted)
        achieved = self.rows_trained * (self.flops_per_row or 0.0) / max(train_s, 1e-9) / 1e9  # GFLOP/s
        achieved, samples = D.all_reduce_sum(torch.tensor([achieved, float(self.samples_trained)], dtype=torch.float64,
                                                          device=self.device)).tolist()
        out = self.clock.metrics()
        if samples > 0:
            out["throughput/samples_per_s"] = samples / max(train_s, 1e-9)
            out["throughput/matmul_gflops"] = self.matmul_rate
            out["throughput/flops_per_sample"] = (self.flops_per_row or 0.0)
            if self.matmul_rate > 0:
                out["throughput/matmul_fraction"] = achieved / self.matmul_rate
        self.log.log(self.state.step, out)
        self.console.info(throughput_line(totals, out.get("throughput/samples_per_s"),
                                          out.get("throughput/matmul_fraction"), self.matmul_rate))
        return out

    # -- data checks ----------------------------------------------------------------------------
    @staticmethod
    def _check_data(cfg: Config, folder: ShardFolder) -> None:
        """Refuse a missing or empty train/dev split by name, and shards that differ from the manifest, before
        anything is trained: the dev and KB shards (eval.verify_checksums, on by default: the dev numbers choose
        the best model and stop training early), or every shard (data.verify_checksums)."""
        counts = folder.counts
        for split in ("train", "dev"):
            if not counts.get(split):
                state = "empty" if split in counts else "missing (not converted)"
                raise RunSetupError(f"the {split} split of {cfg.data.shards} is {state}: training needs {split} mentions")
        shares = dict(rank=D.rank(), world=D.world(), gather=D.gather_objects)  # the files shared over the ranks
        try:
            if cfg.data.verify_checksums:
                folder.verify(None, "data.verify_checksums", **shares)
            elif cfg.eval.verify_checksums:
                folder.verify(["kb", "dev"], "set eval.verify_checksums=false to train anyway", **shares)
        except ShardError as err:
            raise RunSetupError(str(err)) from None

    def _save(self) -> Path:
        with self.clock.phase("checkpoint"):
            self.state.phase_s = self.clock.totals()
            return self.checkpoints.save(self.state, self.log.rows)

    # -- preemption -------------------------------------------------------------------------------
    def _announce_grace(self) -> None:
        """How long a stop signal needs before the scheduler's kill: one step plus one checkpoint, the
        checkpoint from the resumed one's record or estimated from the state size and a write probe."""
        names = self.stops.names()
        if not D.is_main():
            return
        if self.resumed is not None and "save_s" in self.resumed:
            cost = f"the checkpoint resumed from took {self.resumed['save_s']:.2f}s to write"
        else:
            n_bytes = 3 * sum(p.numel() * p.element_size() for p in self.engine.module.parameters())  # weights, 2 moments
            rate = write_rate_mb_s(self.run_dir)
            cost = f"a checkpoint holds about {n_bytes / 2**20:.1f} MiB per rank, " + (
                f"about {n_bytes / 2**20 / rate:.2f}s at the {rate:.0f} MiB/s measured here" if rate else
                f"but the run folder's disk has only {shutil.disk_usage(self.run_dir).free / 2**20:.0f} MiB free")
        self.console.info(f"[preemption] {names}: every rank stops at the next optimizer step, writes a checkpoint and "
                          f"exits {PREEMPTED_EXIT_CODE}; {cost}; allow that plus one step (SLURM: #SBATCH --signal)")

    def _preempt(self, saved: bool) -> None:
        """The ranks agreed to stop after this step: a complete checkpoint, the record, then Preempted."""
        st, reason = self.state, describe(self._stop_code)
        folder = ckpt.checkpoint_folder(self.ckpt_dir, st.step) if saved else self._save()
        waited = time.monotonic() - self.stops.received_at if self.stops.received_at is not None else None
        if D.is_main():
            write_record(self.run_dir, st.step, reason, folder, waited)
        D.barrier()
        self.console.warn(f"[preemption] {reason}: stopped after step {st.step}, complete checkpoint {folder}; exiting "
                          f"with {PREEMPTED_EXIT_CODE} (continue with --resume auto)")
        raise Preempted(st.step, reason, folder)

    # -- one micro-batch, one optimizer step -----------------------------------------------------
    def _train_micro_batch(self, batch: dict) -> bool:
        """Forward, backward and engine step on one micro-batch; True when it closed a gradient
        accumulation (the engine took an optimizer step)."""
        if self.flops_per_row is None:  # this process's first micro-batch: count what a forward and backward costs
            (parts, moe_log), flops = count_flops(lambda: self._micro_step(batch))
            self.flops_per_row = flops / max(1, len(batch["weight"]))
        else:
            parts, moe_log = self._micro_step(batch)
        samples = int((batch["weight"] > 0).sum())
        self.rows_trained += len(batch["weight"])
        self.samples_trained += samples
        self.window.add(parts, moe_log.load, samples)
        self.state.batch += 1
        return self._optimizer_stepped()

    def _optimizer_stepped(self) -> bool:
        """The accumulation boundary, seen after ``engine.step()``: its step counter moved past ours."""
        return self.engine.global_steps != self.state.step

    def _micro_step(self, batch: dict) -> tuple[dict[str, torch.Tensor], object]:
        scores, moe_log = self.engine(_to(batch["mentions"], self.device), _to(batch["entities"], self.device))
        faults.rank_fault(self.engine.global_steps + 1, D.rank())  # tests: a rank that dies or hangs mid-step
        loss, parts = contrastive_loss(scores, batch["gold_ids"].to(self.device), batch["candidate_ids"].to(self.device),
                                       self.cfg.loss, moe_log, row_weight=batch["weight"].to(self.device))
        if faults.flag("NAN_LOSS_AT_STEP") == self.engine.global_steps + 1:  # fault injection (tests)
            loss = loss * float("nan")
            parts = {**parts, "loss": loss.detach()}
        self._loss_finite &= bool(torch.isfinite(loss))
        self.engine.backward(loss)
        if self.engine.is_gradient_accumulation_boundary():
            self.grad_norm = self._grad_norm_before_step()
            self._loss_finite, self._stop_code = self._agree(self._loss_finite, self.stops.local_code())
            self.guard.skip_next, self.guard.skipped_last = not self._loss_finite, False
        self.engine.step()
        return parts, moe_log

    def _end_step(self, epoch_done: bool) -> None:
        """Book the optimizer step just taken: step counter, data position, progress bar, and its losses
        into the metrics window unless it was a skipped bad step."""
        st = self.state
        st.step = self.engine.global_steps
        if epoch_done:
            st.epoch, st.batch, st.epoch_segments = st.epoch + 1, 0, []
        self.bar.update(1)
        self.window.end_step(applied=self._check_step(self.window.step_means()))

    def _agree(self, ok: bool, stop_code: int) -> tuple[bool, int]:
        """One reduction per optimizer step: whether ``ok`` (a finite loss) holds on every rank, and the
        largest stop code of any rank (0: nobody was asked to stop)."""
        if D.world() == 1:
            return ok, stop_code
        t = torch.tensor([0.0 if ok else 1.0, float(stop_code)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t[0].item() == 0, int(t[1].item())

    def _check_step(self, step_parts: dict[str, float]) -> bool:
        """After an optimizer step: True if it was applied. A bad step (non-finite loss or gradient
        norm on any rank; GuardedAdamW left the weights alone) is counted; beyond
        train.max_bad_steps, training stops with TrainingDiverged."""
        loss_finite, self._loss_finite = self._loss_finite, True
        norm = self._last_grad_norm()
        norm = float(norm) if norm is not None else None
        # fp16: an overflow is DeepSpeed's loss-scale business (it skips the step and lowers the scale)
        norm_ok = norm is None or math.isfinite(norm) or self.precision == "fp16"
        if loss_finite and norm_ok and not self.guard.skipped_last:
            return True
        st, allowed = self.state, self.cfg.train.max_bad_steps
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

    def _last_grad_norm(self) -> float | None:
        """The last optimizer step's global gradient norm: ours (plain fp32) or DeepSpeed's."""
        return self.grad_norm if self.grad_norm is not None else self.engine.get_global_grad_norm()

    # -- schedule ---------------------------------------------------------------------------------
    def _should_stop(self) -> bool:
        return self.state.step >= self.total_steps or self.state.stopped_early

    def _should_log(self) -> bool:
        step = self.state.step
        return self.window.micro > 0 and (step % self.cfg.train.log_every == 0 or step == self.total_steps)

    def _should_eval(self, epoch_done: bool) -> bool:
        """Dev evaluation after every train.eval_every_epochs-th epoch and every train.eval_every_steps-th step."""
        t, st = self.cfg.train, self.state
        at_epoch = epoch_done and t.eval_every_epochs > 0 and st.epoch % t.eval_every_epochs == 0
        at_step = t.eval_every_steps > 0 and st.step % t.eval_every_steps == 0
        return at_epoch or at_step

    def _should_save(self, evaluated: bool) -> bool:
        """A checkpoint after every dev evaluation and every train.save_every_steps-th step."""
        every = self.cfg.train.save_every_steps
        return evaluated or (every > 0 and self.state.step % every == 0)

    # -- logging ----------------------------------------------------------------------------------
    def _log_window(self) -> None:
        """One metrics row for the window's applied steps (and a console line when there is no progress bar)."""
        st, w = self.state, self.window
        samples_per_s = w.samples_per_s(D.world())
        metrics = w.mean_losses()
        metrics.update(lr_metrics(self.guard.param_groups, self.scheduler.get_last_lr()))
        norm = self._last_grad_norm()
        if norm is not None:
            metrics["train/grad_norm"] = float(norm)
        metrics["train/bad_steps"] = st.bad_steps
        metrics["train/samples_per_s"] = samples_per_s
        metrics["train/epoch"] = st.epoch + self._epoch_fraction()
        metrics.update(self._expert_load(w.loads))
        self.log.log(st.step, metrics)
        self.bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", sps=f"{samples_per_s:.0f}")
        if self.bar.disable:  # no terminal (batch job, CI): a line per log step instead
            self.console.info(f"[train] step {st.step}/{self.total_steps} epoch {metrics['train/epoch']:.2f} "
                              f"loss {metrics['train/loss']:.4f} lr {metrics['train/lr']:.2e} {samples_per_s:.0f} samples/s")
        w.reset()

    def _epoch_fraction(self) -> float:
        """How much of the current epoch is done, its earlier segments (other layouts) included."""
        st = self.state
        if not st.epoch_segments:
            return st.batch / self.batches_per_epoch
        share = self.stream.segment_size() / self.stream.shards.total  # of the epoch, left when this segment began
        return 1.0 - share * (1.0 - st.batch / max(1, self.epoch_batches))

    def _expert_load(self, loads: dict[str, list]) -> dict[str, float]:
        """Fraction of routes per expert and dropped tokens, per MoE layer, over all ranks.

        Both backends count, on each rank, the routes of that rank's own tokens to every (global)
        expert before any all-to-all (DeepSpeed's exp_counts are per rank), so the sum over the
        world is each expert's whole load: every expert-parallel group plus, when world > ep_size,
        the data-parallel replicas of its experts."""
        out: dict[str, float] = {}
        for name, (counts, dropped) in sorted(loads.items()):
            t = torch.cat([counts.float().view(-1), dropped.float().view(1)]).to(self.device)
            if D.world() > 1:
                dist.all_reduce(t)
            frac = t[:-1] / t[:-1].sum().clamp_min(1)
            for e, f in enumerate(frac.tolist()):
                out[f"moe/{name}/expert{e}"] = f
            out[f"moe/{name}/dropped_tokens"] = t[-1].item()
        return out

    # -- hard negatives -------------------------------------------------------------------------
    def _negatives_for_epoch(self) -> None:
        """Mine when the schedule says so (at an epoch start), then attach the current table."""
        n, st = self.cfg.negatives, self.state
        if not n.enabled:
            return
        e = st.epoch
        if st.negatives_file is None and n.from_file:
            st.negatives_file = n.from_file
        since = e - n.warmup_epochs
        due = since == 0 or (since > 0 and n.refresh_epochs > 0 and since % n.refresh_epochs == 0)
        if due and st.batch == 0 and st.negatives_epoch != e:
            try:
                with self.clock.phase("mining"), local_experts(self.engine.module) as model:  # every expert on every rank
                    table, stats = mine(model, self.cfg, self.device, self.collator, interrupt=self._stop_requested)
            except Interrupted as where:  # a stop signal: checkpoint now, mine again after the resume
                self._stopped_during("mining", where)
                self._preempt(saved=False)
            path = self.run_dir / "negatives" / f"epoch-{e:03d}.npy"
            if D.is_main():
                save_table(table, path, {"epoch": e, "step": st.step, **stats})
            self.console.info(f"[negatives] mined {stats['mentions']} x {stats['top_k']} in {stats['total_s']:.1f}s "
                              f"(KB {stats['kb_size']}) -> {path}")
            D.barrier()
            st.negatives_file, st.negatives_epoch = str(path), e
            self.log.log(st.step, {f"negatives/{k}": v for k, v in stats.items() if isinstance(v, (int, float))})
        if st.negatives_file and (self._attached != st.negatives_file):
            self.stream.set_negatives(load_table(st.negatives_file), n.n_hard, n.strategy)
            self._attached = st.negatives_file

    # -- evaluation -----------------------------------------------------------------------------
    def _stop_requested(self) -> bool:
        """Collective, at the check points of an evaluation or of mining: whether any rank was asked to stop
        (the stop code is kept, as at a step boundary). A long evaluation would outlast the grace a scheduler
        gives between its stop signal and its kill, with this step's checkpoint not yet written."""
        if D.is_main():
            faults.signal_point("SIGNAL_IN_EVAL", self.state.step)  # tests: a signal mid-way
        _, code = self._agree(True, self.stops.local_code())
        self._stop_code = self._stop_code or code
        return code != 0

    def _stopped_during(self, what: str, where: Interrupted) -> None:
        self.console.warn(f"[preemption] {describe(self._stop_code)} during {what} ({where}): it is left for the "
                          "resumed run")

    def _evaluate_dev(self) -> bool:
        """Evaluate on dev, keep the best model, decide early stopping; False when a stop signal cut it short."""
        st = self.state
        # the last evaluation of the run keeps its KB cache: if it makes the best model, the test evaluation
        # (the same weights, the same eval settings) uses it instead of encoding the KB again
        last = self.cfg.train.test_at_end and st.step >= self.total_steps
        with self.clock.phase("dev_eval"):
            try:
                with local_experts(self.engine.module) as model:  # DeepSpeed MoE layers: every expert on every rank
                    res = evaluate_split(model, self.cfg, "dev", self.device, self.collator,
                                         interrupt=self._stop_requested, keep_kb=last)
            except Interrupted as where:
                self._stopped_during("the dev evaluation", where)
                return False
            m = res.metrics
            improved = m["MRR"] > st.best_mrr
            st.evals.append({"step": st.step, "epoch": st.epoch, "MRR": m["MRR"], "H@1": m["H@1"]})
            if improved:
                st.best_mrr, st.best_step, st.bad_evals = m["MRR"], st.step, 0
                self._save_best()
            else:
                st.bad_evals += 1
            self._dev_kb = (st.step, res.entities) if improved and res.entities is not None else None
            res.entities = None
            D.barrier()
        self.console.info(one_line(res) + ("  * new best" if improved else f"  (best MRR {st.best_mrr:.2f})"))
        self.log.log(st.step, {f"dev/{k}": v for k, v in m.items()} | {"dev/best_MRR": st.best_mrr})
        patience = self.cfg.train.patience
        if patience and st.bad_evals >= patience:
            st.stopped_early = True
        return True

    def _save_best(self) -> None:
        """Export the model to best/ (every rank gathers experts; rank 0 writes). A full disk on rank 0 (the
        partial best.tmp/ removed, the previous best/ untouched) is raised on every rank as OSError ENOSPC; a
        best/ holding someone else's files, as RunSetupError."""
        failure = None
        try:
            with self.clock.phase("checkpoint"):
                save_export(self.engine.module, self.cfg, self.run_dir / "best")
        except OSError as err:
            if not (disk_full(err) or isinstance(err, ExportTargetError)):
                raise
            failure = ("full", str(err.filename)) if disk_full(err) else ("refused", str(err))
        failure = D.from_main(failure)  # the other ranks would wait for rank 0 at the next collective
        if failure and failure[0] == "full":
            raise OSError(errno.ENOSPC, f"no space left on device while writing the best model export {failure[1]}",
                          failure[1])
        if failure:
            raise RunSetupError(failure[1])

    def _evaluate_test(self) -> EvalResult | None:
        best = self.run_dir / "best"
        if not (best / "model.safetensors").is_file():
            return None
        try:
            ev.verify_eval_data(self.cfg, "test")  # the results cite the manifest: its shards must match it
        except ShardError as err:
            raise RunSetupError(str(err)) from None
        model, _ = load_export(best)
        self.engine.module.load_state_dict(model.state_dict())  # every rank evaluates the best weights
        kept, self._dev_kb = self._dev_kb, None
        entities = kept[1] if kept is not None and kept[0] == self.state.best_step else None  # of these weights
        try:
            with self.clock.phase("test_eval"), local_experts(self.engine.module) as module:
                res = evaluate_split(module, self.cfg, "test", self.device, self.collator,
                                     interrupt=self._stop_requested, entities=entities)
        except Interrupted as where:
            self._stopped_during("the test evaluation", where)
            return None
        if D.is_main():
            board = write_outputs(res, self.cfg, self.run_dir, str(best), self.cfg.train.run_name)
            self.log.log(self.state.step, {f"test/{k}": v for k, v in res.metrics.items()})
            self.console.info(one_line(res))
            self.console.info(board.read_text())
        return res

"""The DeepSpeed training loop: stream -> model -> loss -> engine step, and the schedule of what happens between
steps. The pieces it drives: the engine and data checks (train/build.py), bad steps (train/step_guard.py), hard
negatives (train/negatives.py), dev/test evaluation with best-model export and early stopping on MRR
(train/validator.py), resumable checkpoints (train/checkpoint_manager.py), stop signals (train/preemption.py),
metrics and console (train/observe.py, train/phases.py)."""

from __future__ import annotations

import atexit
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from core import faults
from data_shards.collate import load_tokenizer
from data_shards.folder import ShardFolder
from data_shards.stream import TrainStream, make_loader
from eval.encode import Interrupted
from model import distributed as D
from model.config import Config, save_config
from model.export import recover_export
from model.factory import make_collator, resolve_tokenizer
from model.mmoe import BATCH_KEYS, build_model
from moe.layer_spec import check_ep_world
from train import checkpointing as ckpt
from train.build import build_engine, check_data, resolve_precision, seed_everything
from train.checkpoint_manager import CheckpointManager, RunSetupError
from train.loss import contrastive_loss
from train.negatives import NegativesSchedule
from train.observe import MetricsWindow, RankLog, RunLog, expert_load
from train.optim_groups import lr_metrics
from train.phases import PhaseClock, count_flops, matmul_gflops, throughput_report
from train.preemption import PREEMPTED_EXIT_CODE, Preempted, Preemption, StopRequests, clear_record
from train.run_folder import RunFolderError, RunFolderLock, mark, prepare_fresh
from train.state import TrainState
from train.step_guard import StepGuard
from train.validator import Validator


def _to(batch: dict, device: torch.device) -> dict:
    return {k: batch[k].to(device, non_blocking=True) for k in BATCH_KEYS}


class Trainer:
    """Builds the run's pieces (one line each in ``__init__``) and runs the loop between them: ``guard`` (bad steps,
    the per-step agreement of every rank), ``validator`` (dev/test, best model, early stopping), ``negatives``
    (mining schedule), ``checkpoints`` (save/resume), ``preemption`` (the agreed stop code), ``log``/``window``/
    ``console``/``clock`` (metrics rows, W&B, console, phase times)."""

    def __init__(self, cfg: Config, resume: str = "none", allow_data_change: bool = False, overwrite: bool = False,
                 break_lock: bool = False, allow_config_change: bool = False) -> None:
        import deepspeed  # noqa: F401  (first, as always: before the threads, the stop signals, the process group)

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
        check_data(cfg, self.folder)
        self.collator = make_collator(cfg, model)
        self.stream = TrainStream(self.folder, self.collator, cfg.data.batch_size, seed=cfg.data.seed, world=D.world(),
                                  rank=D.rank(), num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer,
                                  fraction=cfg.data.train_fraction, fraction_mode=cfg.data.train_fraction_mode)
        self.batches_per_epoch = self.stream.full_epoch_batches()  # of an epoch started with this layout
        self.epoch_batches = self.batches_per_epoch  # of the current epoch (fewer when it began on other hardware)
        steps_by_epochs = cfg.train.epochs * self.batches_per_epoch // cfg.train.grad_accum
        self.total_steps = min(steps_by_epochs, cfg.train.max_steps) if cfg.train.max_steps > 0 else steps_by_epochs
        self.precision = resolve_precision(cfg.train.precision)
        self.engine, optimizer, self.scheduler = build_engine(model, cfg, self.precision, self.total_steps)
        self.preemption = Preemption(self.stops, self.run_dir, self.device, self.console)  # the agreed stop code
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
        if D.is_main():
            save_config(cfg, self.run_dir / "config.yaml")
            clear_record(self.run_dir)
        r = self.resumed
        self.log = RunLog(cfg, self.run_dir, D.is_main(), resume_id=self.state.wandb_id,
                          keep_rows=r.get("metrics_rows") if r else 0, keep_step=self.state.step if r else None)
        self.state.wandb_id = self.log.wandb_id
        self.window = MetricsWindow()  # the training metrics since the last log row
        self.bar: tqdm | None = None  # progress bar of the optimizer steps (rank 0, on a terminal)
        self.guard = StepGuard(self.engine, optimizer, cfg, self.precision, self.device, self.log, self.console)
        self.validator = Validator(self.engine, cfg, self.device, self.collator, self.run_dir, self.total_steps,
                                   self.clock, self.log, self.console, self._stop_requested,
                                   self.preemption.stopped_during)
        self.negatives = NegativesSchedule(self.engine, cfg, self.device, self.collator, self.stream, self.run_dir,
                                           self.clock, self.log, self.console, self._stop_requested)
        self.preemption.announce_grace(self.resumed, self.engine.module)

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
            if not self.validator.evaluate_dev(st):
                self._preempt(saved=True)  # stopped again in it: the checkpoint resumed from still holds
            st.eval_pending = False
        while st.epoch < self.cfg.train.epochs and not self._should_stop():
            try:
                self.negatives.for_epoch(st)
            except Interrupted as where:  # a stop signal: checkpoint now, mine again after the resume
                self.preemption.stopped_during("mining", where)
                self._preempt(saved=False)
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
                if evaluated and self.preemption.code:  # a stop came first: evaluate after the resume, not in the grace
                    st.eval_pending, evaluated = True, False
                if evaluated and not self.validator.evaluate_dev(st):  # a stop signal came in during the evaluation
                    st.eval_pending, evaluated = True, False
                saved = self._should_save(evaluated)
                if saved:
                    self._save()
                    faults.kill_point("KILL_AT_STEP", st.step)
                if self.preemption.code:
                    self._preempt(saved)
                if D.is_main():
                    faults.signal_point("SIGNAL_AT_STEP", st.step)  # tests: a scheduler's signal
            if epoch_done or (stepped and self._should_stop()):
                return

    def _finish(self) -> dict:
        """A dev evaluation if there was none, the last checkpoint, the test evaluation; closes the logs."""
        st = self.state
        if st.best_step < 0 and not self.validator.evaluate_dev(st):  # never evaluated on dev (a short run): now
            st.eval_pending = True  # stopped in it: evaluated after the resume
            self._preempt(saved=False)
        self._save()
        result = {"state": self.state.state_dict()}
        if self.cfg.train.test_at_end:
            res = self.validator.evaluate_test(self.state)
            if self.preemption.code:  # stopped in it: the final checkpoint is written; the resume evaluates again
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
        out, line = throughput_report(self.clock, self.rows_trained, self.samples_trained, self.flops_per_row,
                                      self.matmul_rate, self.device)
        self.log.log(self.state.step, out)
        self.console.info(line)
        return out

    def _save(self) -> Path:
        with self.clock.phase("checkpoint"):
            self.state.phase_s = self.clock.totals()
            return self.checkpoints.save(self.state, self.log.rows)

    # -- preemption -------------------------------------------------------------------------------
    def _preempt(self, saved: bool) -> None:
        """The ranks agreed to stop after this step: a complete checkpoint, the record, then Preempted."""
        folder = ckpt.checkpoint_folder(self.ckpt_dir, self.state.step) if saved else self._save()
        self.preemption.preempt(self.state.step, folder)

    def _stop_requested(self) -> bool:
        """Collective, at the check points of an evaluation or of mining: whether any rank was asked to stop."""
        return self.preemption.requested(self.state.step)

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
        self.guard.note_loss(loss)
        self.engine.backward(loss)
        if self.engine.is_gradient_accumulation_boundary():  # the step's one agreement of every rank (collective)
            self.preemption.code = self.guard.before_step(self.stops.local_code)
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
        self.window.end_step(applied=self.guard.check_step(st, self.window.step_means()))

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
        metrics.update(lr_metrics(self.guard.optimizer.param_groups, self.scheduler.get_last_lr()))
        norm = self.guard.last_grad_norm()
        if norm is not None:
            metrics["train/grad_norm"] = float(norm)
        metrics["train/bad_steps"] = st.bad_steps
        metrics["train/samples_per_s"] = samples_per_s
        metrics["train/epoch"] = st.epoch + self._epoch_fraction()
        metrics.update(expert_load(w.loads, self.device))
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

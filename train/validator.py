"""Evaluation during and after training: the dev evaluation that keeps the best model (best/) and decides early
stopping on MRR (train.patience), and the test evaluation of the best model that writes the run's outputs and
leaderboard. The last dev evaluation of a run hands its KB cache to the test evaluation when it made the best
model (the same weights, the same eval settings), which then does not encode the KB again."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path

import torch

from core.cli import disk_full
from data_shards.store import ShardError
from eval import evaluate as ev
from eval.encode import Interrupted
from eval.evaluate import EvalResult, evaluate_split, one_line, write_outputs
from model import distributed as D
from model.config import Config
from model.export import ExportTargetError, load_export, save_export
from moe.expert_parallel import local_experts
from train.checkpoint_manager import RunSetupError
from train.observe import RankLog, RunLog
from train.phases import PhaseClock
from train.state import TrainState


class Validator:
    def __init__(self, engine, cfg: Config, device: torch.device, collator, run_dir: Path, total_steps: int,
                 clock: PhaseClock, log: RunLog, console: RankLog, interrupt: Callable[[], bool],
                 stopped_during: Callable[[str, Interrupted], None]) -> None:
        """``interrupt`` (collective): whether any rank was asked to stop, asked at an evaluation's check points;
        ``stopped_during(what, where)``: the note on an evaluation a stop cut short."""
        self.engine, self.cfg, self.device, self.collator = engine, cfg, device, collator
        self.run_dir, self.total_steps = run_dir, total_steps
        self.clock, self.log, self.console = clock, log, console
        self.interrupt, self.stopped_during = interrupt, stopped_during
        self._dev_kb: tuple[int, EvalResult] | None = None  # the last dev evaluation's KB cache, for the test

    def evaluate_dev(self, st: TrainState) -> bool:
        """Evaluate on dev, keep the best model, decide early stopping; False when a stop signal cut it short."""
        # the last evaluation of the run keeps its KB cache: if it makes the best model, the test evaluation
        # (the same weights, the same eval settings) uses it instead of encoding the KB again
        last = self.cfg.train.test_at_end and st.step >= self.total_steps
        with self.clock.phase("dev_eval"):
            try:
                with local_experts(self.engine.module) as model:  # DeepSpeed MoE layers: every expert on every rank
                    res = evaluate_split(model, self.cfg, "dev", self.device, self.collator,
                                         interrupt=self.interrupt, keep_kb=last)
            except Interrupted as where:
                self.stopped_during("the dev evaluation", where)
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

    def evaluate_test(self, st: TrainState) -> EvalResult | None:
        """The best model on test (every rank loads its weights), the run's outputs and leaderboard; None without
        a best model or when a stop signal cut it short."""
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
        entities = kept[1] if kept is not None and kept[0] == st.best_step else None  # of these weights
        try:
            with self.clock.phase("test_eval"), local_experts(self.engine.module) as module:
                res = evaluate_split(module, self.cfg, "test", self.device, self.collator,
                                     interrupt=self.interrupt, entities=entities)
        except Interrupted as where:
            self.stopped_during("the test evaluation", where)
            return None
        if D.is_main():
            board = write_outputs(res, self.cfg, self.run_dir, str(best), self.cfg.train.run_name)
            self.log.log(st.step, {f"test/{k}": v for k, v in res.metrics.items()})
            self.console.info(one_line(res))
            self.console.info(board.read_text())
        return res

"""The run's checkpoints, in one room: save, verify, fall back, convert and load every stateful part
(DeepSpeed's engine: weights, optimizer, schedule; the ``TrainState``: data position, best-so-far, negatives,
epoch segments; the metrics row count; the RNG). The files and their checks live in train/checkpointing.py,
the conversion to another MoE layout in train/relayout.py, the re-planning of an epoch in data_shards/stream.py.

What may differ between the checkpoint and the resumed run:
- world size, batch size, DataLoader workers, shuffle buffer: the interrupted epoch continues over the samples
  not yet consumed; optimizer state partitioned by the old world size (ZeRO 1/2, bf16) is re-cut through
  DeepSpeed's universal checkpoint (train/universal.py) without native MoE layers, by our own merge with them
  (train/zero_merge.py, train/relayout.py);
- the MoE backend or ep_size, with the world size or not: weights and optimizer state are converted
  (train/relayout.py; ZeRO 0-2, fp32 or bf16);
- the shards (another manifest) only with --allow-data-change; the training subset never.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from core import faults
from data_shards.stream import TrainStream
from model import distributed as D
from model.config import Config
from train import checkpointing as ckpt
from train import relayout, universal, zero_merge
from train.observe import RankLog
from train.state import TrainState


class RunSetupError(RuntimeError):
    """The run cannot start as asked (reported without a traceback by launch/train.py)."""


# The data plan's keys a resumed run may change: the rest of the epoch is re-planned over the samples not
# yet consumed (data_shards/stream.py). Any other layout key must stay as it was.
REPLANNED = ("world", "batch_size", "num_workers", "shuffle_buffer")

class CheckpointManager:
    def __init__(self, engine, optimizer: torch.optim.Optimizer, stream: TrainStream, cfg: Config, ckpt_dir: Path,
                 console: RankLog, manifest_sha256: str, precision: str, allow_data_change: bool = False,
                 allow_config_change: bool = False) -> None:
        """``optimizer``: the client optimizer inside DeepSpeed's wrappers (its state is what a layout
        conversion moves); ``precision``: the resolved one (fp32, bf16, fp16)."""
        self.engine, self.optimizer, self.stream, self.cfg = engine, optimizer, stream, cfg
        self.precision = precision
        self.ckpt_dir, self.console = ckpt_dir, console
        self.manifest_sha256, self.allow_data_change = manifest_sha256, allow_data_change
        self.allow_config_change = allow_config_change
        self.first_save = True  # the first save of this process prints how long it took (the grace a stop needs)

    def layout(self) -> dict:
        d = self.cfg.data
        return {"world": D.world(), "batch_size": d.batch_size, "num_workers": d.num_workers,
                "shuffle_buffer": d.shuffle_buffer, "train_fraction": d.train_fraction,
                "zero_stage": self.cfg.train.zero_stage, "precision": self.precision}

    # -- save -------------------------------------------------------------------------------------
    def save(self, state: TrainState, metrics_rows: int) -> Path:
        """A complete checkpoint of the current step (collective)."""
        folder = ckpt.save(self.engine, self.ckpt_dir, state.step,
                           {"trainer": state.state_dict(), "layout": self.layout(), "fixed": ckpt.fixed_settings(self.cfg),
                            "manifest_sha256": self.manifest_sha256, "metrics_rows": metrics_rows},
                           self.cfg.train.keep_checkpoints,
                           write_extra=self._write_names)
        if faults.enabled("DUMP_FULL"):  # tests: the whole state as saved, to compare with a resume
            self._dump_full(self.ckpt_dir.parent / f"saved-{folder.name}-rank{D.rank()}.pt")
        if self.first_save:
            self.first_save = False
            seconds = json.loads((folder / ckpt.COMPLETE).read_text())["save_s"] if D.is_main() else 0.0
            self.console.info(f"[preemption] the first checkpoint took {seconds:.2f}s: a stop signal needs that "
                              "plus one optimizer step of grace")
        return folder

    def _write_names(self, folder: Path) -> None:
        """Every rank: what a conversion to another MoE layout or world size needs to tell parameters apart."""
        relayout.save_param_names(self.engine.module, self.optimizer, folder)
        zero_merge.save_expert_names(self.engine.module, folder)

    # -- resume -----------------------------------------------------------------------------------
    def resume(self, resume: str, state: TrainState) -> dict | None:
        """``--resume`` none | auto | a folder: loads the newest loadable checkpoint into the engine and
        ``state``; returns its complete.json (None: a fresh start). Damaged checkpoints are reported and
        skipped (auto falls back to the previous one)."""
        removed, left = ckpt.remove_incomplete(self.ckpt_dir)
        if removed:
            self.console.warn(f"removed incomplete checkpoint(s): {', '.join(p.name for p in removed)}")
        if left:
            self.console.warn(f"left alone in {self.ckpt_dir} (not checkpoints written by this trainer): "
                              f"{', '.join(p.name for p in left)}")
        candidates = self._candidates(resume)
        if not candidates:
            return None
        failures = []
        for i, folder in enumerate(candidates):
            problem = ckpt.damage(folder)
            if problem is None:
                self._check_compatible(folder, json.loads((folder / ckpt.COMPLETE).read_text()))
                try:
                    saved = self._load(folder)
                except (relayout.RelayoutError, universal.UniversalError) as err:
                    raise RunSetupError(str(err)) from None
                except Exception as err:  # e.g. a damaged checkpoint written before files were recorded
                    problem = f"it cannot be loaded ({type(err).__name__}: {str(err).splitlines()[0][:160]})"
            if problem is None:
                break
            failures.append(f"{folder.name}: {problem}")
            more = i + 1 < len(candidates)
            self.console.warn(f"checkpoint {folder} is damaged: {problem}"
                              + ("; falling back to the previous complete checkpoint" if more else ""))
        else:
            raise RunSetupError(f"no loadable checkpoint in {self.ckpt_dir if resume == 'auto' else resume}: "
                                + "; ".join(failures))
        D.barrier()  # every rank has read the folder before any rank may rewrite it (a save at the same step)
        state.load_state_dict(saved["trainer"])
        self.first_save = False
        self.console.warn(f"resumed from {folder} at step {state.step} (epoch {state.epoch}, batch {state.batch})")
        self._replan(saved["layout"], state)
        if faults.enabled("DUMP_LOADED"):  # tests: the state right after loading, to compare with the files
            torch.save({"module": self.engine.module.state_dict(), "optimizer": self.optimizer.state_dict()},
                       self.ckpt_dir.parent / f"loaded-rank{D.rank()}.pt")
        if faults.enabled("DUMP_FULL"):
            self._dump_full(self.ckpt_dir.parent / f"loaded-{folder.name}-rank{D.rank()}.pt")
        return saved

    def _dump_full(self, path: Path) -> None:
        """Tests: this rank's share of the state. The weights (whole on every rank), the step counter and
        learning rates, and, under ZeRO, each group's flat fp32 partition with its Adam moments and the group's
        element count: the test joins the ranks' partitions to compare them across world sizes."""
        out: dict = {"global_steps": self.engine.global_steps, "lr": [g["lr"] for g in self.optimizer.param_groups],
                     "weights": {k: v.detach().cpu() for k, v in self.engine.module.state_dict().items()}}
        zero = self.engine.optimizer if self.engine.zero_optimization() else None
        if zero is not None:
            out["partitions"] = [
                {"numel": sum(p.numel() for p in zero.bit16_groups[i]), "fp32": flat.detach().cpu(),
                 **{m: zero.optimizer.state.get(flat, {}).get(m) for m in relayout.MOMENTS}}
                for i, flat in enumerate(zero.single_partition_of_fp32_groups)]
        out["params"] = self._whole_params()
        torch.save(out, path)

    def _whole_params(self) -> dict[str, dict[str, torch.Tensor]]:
        """Tests: each parameter's whole fp32 weight and Adam moments, experts by global name (collective)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        rename = zero_merge.expert_names(self.engine.module)
        partitioned = any(hasattr(p, "_hp_mapping") for p in self.engine.module.parameters())
        if partitioned:
            relayout.link_partitions(self.engine, self.optimizer)
        out = {}
        for name, p in self.engine.module.named_parameters():
            if partitioned:
                parts = {"fp32": safe_get_full_fp32_param(p),
                         **{m: safe_get_full_optimizer_state(p, m) for m in relayout.MOMENTS}}
            else:
                state = self.optimizer.state.get(p, {})
                parts = {"fp32": p.detach(), **{m: state.get(m) for m in relayout.MOMENTS}}
            out[rename.get(name, name)] = {k: None if v is None else v.detach().float().cpu() for k, v in parts.items()}
        return out

    def _candidates(self, resume: str) -> list[Path]:
        """The checkpoints to try, newest first."""
        if resume == "none":
            if ckpt.latest_complete(self.ckpt_dir) is not None:
                raise RunSetupError(f"{self.ckpt_dir.parent} already holds checkpoints of an earlier run: pass --resume auto "
                                    "to continue it, or choose another train.run_name (or delete the folder) to start afresh")
            return []
        if resume == "auto":
            found = ckpt.complete_checkpoints(self.ckpt_dir)[::-1]
            if not found:
                self.console.warn(f"--resume auto: no complete checkpoint in {self.ckpt_dir}, starting fresh")
            return found
        folder = Path(resume)
        if not folder.is_dir():
            raise RunSetupError(f"--resume {resume}: no such folder; pass a checkpoint folder "
                                f"({self.ckpt_dir}/step-N) or --resume auto")
        if not (folder / ckpt.COMPLETE).is_file():
            raise RunSetupError(f"--resume {resume}: not a complete checkpoint (no {ckpt.COMPLETE}; a checkpoint "
                                f"folder is {self.ckpt_dir}/step-N, written completely)")
        return [folder]

    def _load(self, folder: Path) -> dict:
        """DeepSpeed's own load for a checkpoint of this run's MoE layout and world size; DeepSpeed's universal
        checkpoint for ZeRO partitions of another world size without native MoE layers; our conversion else."""
        saved = json.loads((folder / ckpt.COMPLETE).read_text())
        world, moe_was = saved["layout"]["world"], relayout.saved_layout(folder)
        other = relayout.layout_differs(moe_was, self.engine.module)
        recut = world != D.world() and bool(universal.partitioned_files(folder))
        if not other and not recut:
            return ckpt.load(self.engine, folder)
        if not other and (moe_was or {}).get("backend") != "deepspeed":
            what = universal.load_universal(self.engine, folder, self.ckpt_dir.parent)
        else:
            if self.precision == "fp16":
                raise RunSetupError(f"checkpoint {folder}: moving fp16 optimizer state (its loss scaler) to another MoE "
                                    "layout or world size is not supported; resume with the checkpoint's layout and "
                                    "world size")
            what = relayout.load_relayout(self.engine, self.optimizer, folder, moe_was, world)
        self.console.warn(f"converted checkpoint {folder}: {what}")
        return saved

    def _check_compatible(self, folder: Path, saved: dict) -> None:
        """The data position continues exactly only with the same shards and subset, and the optimizer state
        only with the same ZeRO stage and precision; world size, batch size, workers and shuffle buffer may
        change (the epoch is re-planned)."""
        now, was = self.layout(), saved["layout"]
        for key, value in now.items():
            if key in was and key not in REPLANNED and was[key] != value:
                raise RunSetupError(f"checkpoint {folder} was written with {key}={was[key]}, this run has "
                                    f"{value}: the data position cannot be continued exactly; use the same setting")
        if "fixed" in saved:  # checkpoints written before the settings were recorded: not checked
            changed = ckpt.changed_settings(saved["fixed"], ckpt.fixed_settings(self.cfg))
            if changed and not self.allow_config_change:
                raise RunSetupError(
                    f"checkpoint {folder} was trained with other settings than this run's: {'; '.join(changed)}. These "
                    "decide the data plan or the model, so the run would no longer continue the one trained: resume "
                    "with the checkpoint's values, or pass --allow-config-change to continue with the new ones anyway")
            if changed:
                self.console.warn(f"warning: resuming with changed settings (--allow-config-change): {'; '.join(changed)}")
        sha = saved.get("manifest_sha256")
        if sha and sha != self.manifest_sha256:
            if not self.allow_data_change:
                raise RunSetupError(
                    f"checkpoint {folder} was trained on shards whose manifest.json has sha256 {sha[:12]}..., but "
                    f"{self.cfg.data.shards}/manifest.json has {self.manifest_sha256[:12]}... (re-converted or other "
                    "data): its data position and mined negatives refer to the old shards. Resume on those shards, or "
                    "pass --allow-data-change to continue on these anyway")
            self.console.warn(f"warning: resuming on other shards than {folder} was trained on (--allow-data-change)")

    def _replan(self, was: dict, state: TrainState) -> None:
        """A checkpoint of another data layout: the interrupted epoch goes on over the samples it had not consumed."""
        now = self.layout()
        changed = [f"{k} {was.get(k, now[k])} -> {now[k]}" for k in REPLANNED if was.get(k, now[k]) != now[k]]
        if not changed:
            return
        if state.batch > 0:
            state.epoch_segments.append({**{k: was.get(k, now[k]) for k in REPLANNED}, "batches": state.batch})
            state.batch = 0
        self.stream.set_position(state.epoch, 0, state.epoch_segments)
        self.console.warn(f"resumed on another layout ({', '.join(changed)}): epoch {state.epoch} continues over the "
                          f"{self.stream.segment_size()} samples not yet consumed in "
                          f"{self.stream.batches_per_epoch()} batches per rank; later epochs follow this layout's plan")

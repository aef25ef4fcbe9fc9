"""Train MMoE: `deepspeed launch/train.py --config launch/configs/NAME.yaml [--set section.key=value ...]`.

Also runs under torchrun and as plain `python launch/train.py ...` (one process).
--resume auto continues from the latest complete checkpoint of the run (a fresh start if none).
--seeds 43,44,45 trains one run per seed (run names suffixed -seed<S>) and writes a mean +- std
leaderboard to <out_dir>/<run_name>-seeds/ (launch/seeds.py).
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
from pathlib import Path

# Run as a script, this file's folder (launch/) comes first on sys.path, where "train" would resolve
# to this very file: replace that entry by the repository root, so the checkout this script belongs
# to supplies every project module (nothing of the project is installed anywhere).
_here = Path(__file__).resolve().parent
sys.path[:] = [str(_here.parent)] + [p for p in sys.path if Path(p or ".").resolve() not in (_here, _here.parent)]

from core.cli import disk_full_line  # noqa: E402
from data_shards.store import ShardError  # noqa: E402
from eval.metrics import NonFiniteScoreError  # noqa: E402
from launch.seeds import SeedsError, parse_seeds, run_seeds  # noqa: E402
from model import distributed as D  # noqa: E402
from model.config import ConfigError, load_config  # noqa: E402
from model.mmoe import ModelSetupError  # noqa: E402
from train.checkpointing import latest_complete  # noqa: E402
from train.preemption import PREEMPTED_EXIT_CODE, Preempted  # noqa: E402
from train.step_guard import TrainingDiverged  # noqa: E402
from train.trainer import RunSetupError, Trainer  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train MMoE with DeepSpeed.")
    p.add_argument("--config", required=True, help="YAML config (launch/configs/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set train.lr=5e-6")
    p.add_argument("--resume", default="none", help="auto | none | a checkpoint folder (trusted: DeepSpeed unpickles it)")
    p.add_argument("--allow-data-change", action="store_true",
                   help="resume although data.shards holds other shards (another manifest) than the checkpoint was trained on")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume although settings that decide the data plan or the model (data.seed, model.*) changed")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run folder that holds files, moving them aside to NAME.replaced-<time>/ first")
    p.add_argument("--break-lock", action="store_true",
                   help="take over a run folder locked by a run on another host (only when none of its processes lives)")
    p.add_argument("--seeds", default=None, metavar="S1,S2,...",
                   help="one run per seed (train.seed, data.seed, tiny_clip.seed) and a mean +- std leaderboard")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config, a.overrides)
    except (ConfigError, FileNotFoundError) as err:
        sys.exit(f"config error: {err}")
    failure = run(a, cfg)
    if failure:
        # Exit once the exception is gone: its frames may hold a DataLoader iterator, whose workers then end
        # cleanly here instead of being killed at exit (torch then prints a "worker killed" traceback).
        gc.collect()
        sys.exit(failure)


def run(a: argparse.Namespace, cfg) -> str | int | None:
    """Train; returns what to exit with: the one line of a failure of ours, PREEMPTED_EXIT_CODE, None (success)."""
    try:
        if a.seeds:
            try:
                run_seeds(cfg, parse_seeds(a.seeds), resume=a.resume)
            except SeedsError as err:
                return f"error: {err}"
        else:
            Trainer(cfg, resume=a.resume, allow_data_change=a.allow_data_change, overwrite=a.overwrite,
                    break_lock=a.break_lock, allow_config_change=a.allow_config_change).run()
        D.shutdown()
    except Preempted as p:  # every rank stopped at the same step after a complete checkpoint
        if D.is_main():
            print(str(p), file=sys.stderr)
        D.shutdown()
        return PREEMPTED_EXIT_CODE
    except (RunSetupError, ModelSetupError, TrainingDiverged, NonFiniteScoreError) as err:
        return f"error: {err}"
    except ShardError as err:  # a shard differs from the manifest (truncated, replaced): named in the message
        msg = str(err)  # raised in a DataLoader worker: the message holds the worker's traceback, then ours
        return f"data error: {msg.rstrip().rsplit('ShardError: ', 1)[-1] if 'Original Traceback' in msg else msg}"
    except OSError as err:
        line = disk_full_line(err, cfg.train.out_dir, then=after_full_disk(cfg))
        if line is None:
            raise
        return line
    except Exception as err:
        if not D.is_peer_failure(err):
            raise
        report_peer_failure(err, cfg)
    return None


def after_full_disk(cfg) -> str:
    """What to do after a full disk stopped the run: continue from its last complete checkpoint, if it has one."""
    last = latest_complete(Path(cfg.train.out_dir) / cfg.train.run_name / "checkpoints")
    if last is not None:
        return f"free space; the last complete checkpoint ({last.name}) is kept, continue with --resume auto"
    return "free space; no complete checkpoint was written yet: start the run again, with --overwrite to move what it wrote aside"


def report_peer_failure(err: BaseException, cfg) -> None:
    """A collective failed: another rank died, hung past train.collective_timeout_s or cannot be reached.
    One line per surviving rank names the ranks that did not check in, then the process exits at once
    (a broken process group can hang in its destructors)."""
    for name in cfg.train.stop_signals:  # the launcher's SIGTERM to the job must not cut the report short
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    timeout = cfg.train.collective_timeout_s
    missing = D.unresponsive_ranks(wait_s=min(timeout, 15))
    if missing is None:
        who = "rank 0 (host of the rendezvous store) cannot be reached: its process or node is gone"
    elif missing:
        who = f"rank(s) {', '.join(map(str, missing))} did not answer (dead, or hung past {timeout}s)"
    else:
        who = "every rank still answers: the failure was in the network or one collective"
    last = latest_complete(Path(cfg.train.out_dir) / cfg.train.run_name / "checkpoints")
    resume = f"The last complete checkpoint is {last}" if last else "No complete checkpoint was written yet"
    print(f"error: rank {D.rank()} of {D.world()}: a collective failed ({str(err).splitlines()[0][:200]}); {who}. "
          f"{resume}: once the failed node is fixed or replaced, start the job again with --resume auto", file=sys.stderr)
    sys.stderr.flush()
    os._exit(1)


if __name__ == "__main__":
    main()

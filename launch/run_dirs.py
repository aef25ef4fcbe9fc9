"""The run folder(s) a `launch/train.py` command line writes: `python launch/run_dirs.py --config C [train.py args]`.

Prints ``<out_dir>/<run_name>`` as an absolute path (relative out_dirs are taken from the current directory, as
train.py does), one line per run: with ``--seeds 43,44`` the runs ``<run_name>-seed43``, ``<run_name>-seed44``.
Arguments train.py takes that do not name the folder (``--resume``, ...) are ignored. A config error is reported
as train.py reports it (exit 1). launch/slurm.sbatch uses it to find ``preempted.json`` after a job step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_here = Path(__file__).resolve().parent  # as in launch/train.py: this checkout's root supplies the project modules
sys.path[:] = [str(_here.parent)] + [p for p in sys.path if Path(p or ".").resolve() not in (_here, _here.parent)]

from launch.seeds import SeedsError, parse_seeds  # noqa: E402
from model.config import ConfigError, load_config  # noqa: E402


def run_dirs(argv: list[str]) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--seeds", default=None)
    a, _ = p.parse_known_args(argv)
    cfg = load_config(a.config, a.overrides)
    root = Path(cfg.train.out_dir).resolve()
    if not a.seeds:
        return [root / cfg.train.run_name]
    return [root / f"{cfg.train.run_name}-seed{s}" for s in parse_seeds(a.seeds)]


def main(argv: list[str] | None = None) -> None:
    try:
        dirs = run_dirs(sys.argv[1:] if argv is None else argv)
    except (ConfigError, FileNotFoundError) as err:
        sys.exit(f"config error: {err}")
    except SeedsError as err:
        sys.exit(f"error: {err}")
    print("\n".join(map(str, dirs)))


if __name__ == "__main__":
    main()

"""One run per seed, and a leaderboard with the mean +- standard deviation over the seeds.

    python launch/train.py --config CFG --seeds 43,44,45 [--set ...]      # also under deepspeed / torchrun
    python -m launch.seeds --runs runs/NAME-seed43 runs/NAME-seed44 ... --out runs/NAME-seeds   # aggregate only

Each seed's run is ``train.run_name`` suffixed with ``-seed<S>`` and sets ``train.seed`` (model
initialisation, dropout), ``data.seed`` (shuffling, and the ``data.train_fraction`` subset) and, for the
tiny CLIP, ``model.tiny_clip.seed`` (its random initialisation). The aggregate reads every run's
``results-test.json`` (written when ``train.test_at_end`` is true) and writes ``<out_dir>/<run_name>-seeds/``:
``leaderboard-test.md`` (the published numbers, the mean +- sample standard deviation row, one row per
seed, then the slices as mean +- std) and ``results-seeds.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

from eval.leaderboard import COLUMNS, PUBLISHED, leaderboard_rows
from eval.slices import LABELS, PAIRS
from model.config import Config


class SeedsError(ValueError):
    """Bad --seeds or a config that cannot compare seeds; the message says why."""


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise SeedsError(f"--seeds {text!r}: expected comma-separated integers, e.g. 43,44,45") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SeedsError(f"--seeds {text!r}: expected distinct seeds, e.g. 43,44,45")
    return seeds


def seed_config(cfg: Config, seed: int) -> Config:
    """The config of one seed's run."""
    cfg = copy.deepcopy(cfg)
    cfg.train.seed = cfg.data.seed = seed
    if not cfg.model.clip_path:
        cfg.model.tiny_clip.seed = seed
    cfg.train.run_name = f"{cfg.train.run_name}-seed{seed}"
    return cfg


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pm(values: list[float], digits: int = 2) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def aggregate(run_dirs: list[Path], out: Path, name: str | None = None, split: str = "test") -> Path:
    """Read each run's results-<split>.json and write the mean +- std leaderboard; returns its path."""
    results = []
    for d in run_dirs:
        path = Path(d) / f"results-{split}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: did the run finish with train.test_at_end true?")
        results.append((Path(d), json.loads(path.read_text())))
    datasets = {r["dataset"] for _, r in results}
    if len(datasets) != 1:
        raise ValueError(f"the runs were evaluated on different datasets: {sorted(datasets)}")
    dataset = datasets.pop()
    name = name or Path(out).name
    metrics = [r["metrics"] for _, r in results]
    n = len(results)
    header = ["model", *COLUMNS, "source"]
    lines = [f"### {dataset} ({split}), {n} run(s): mean ± sample standard deviation", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in leaderboard_rows(dataset, metrics[0], "-")[:-1]:  # the published rows only
        lines.append("| " + " | ".join(row) + " |")
    lines.append(f"| **{name}** | " + " | ".join(_pm([m[c] for m in metrics]) for c in COLUMNS)
                 + f" | mean ± std over {n} |")
    for d, r in results:
        lines.append(f"| {d.name} | " + " | ".join(f"{r['metrics'][c]:.2f}" for c in COLUMNS) + " | this run |")
    if dataset not in PUBLISHED:
        lines += ["", f"No published numbers for {dataset}: only these runs are listed."]
    slice_names = [s for pair in PAIRS for s in pair if all(f"slice/{s}/mentions" in m for m in metrics)]
    summary: dict = {"dataset": dataset, "split": split, "runs": [str(d) for d, _ in results], "mean": {}, "std": {}}
    for key in [*COLUMNS, *(f"slice/{s}/{k}" for s in slice_names for k in ("H@1", "MRR"))]:
        summary["mean"][key], summary["std"][key] = _mean_std([m[key] for m in metrics])
    if slice_names:
        lines += ["", "#### Slices (mean ± std)", "", "| slice | mentions | H@1 | MRR |", "|---|---|---|---|"]
        for s in slice_names:
            counts = sorted({int(m[f"slice/{s}/mentions"]) for m in metrics})
            lines.append(f"| {LABELS[s]} | {'/'.join(map(str, counts))} | {_pm([m[f'slice/{s}/H@1'] for m in metrics])} | "
                         f"{_pm([m[f'slice/{s}/MRR'] for m in metrics])} |")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results-seeds.json").write_text(json.dumps(summary, indent=1))
    board = out / f"leaderboard-{split}.md"
    board.write_text("\n".join(lines) + "\n")
    return board


def run_seeds(cfg: Config, seeds: list[int], resume: str = "none") -> Path | None:
    """Train (and test) one run per seed in this process, then aggregate on rank 0; returns the leaderboard path."""
    from model import distributed as D
    from train.trainer import Trainer

    if not cfg.train.test_at_end:
        raise SeedsError("--seeds compares the runs' test results: leave train.test_at_end true")
    runs = []
    for seed in seeds:
        one = seed_config(cfg, seed)
        if D.is_main():
            print(f"=== seed {seed}: run {one.train.run_name}", flush=True)
        Trainer(one, resume=resume).run()
        runs.append(Path(one.train.out_dir) / one.train.run_name)
    if not D.is_main():
        return None
    board = aggregate(runs, Path(cfg.train.out_dir) / f"{cfg.train.run_name}-seeds", f"{cfg.train.run_name} ({len(seeds)} seeds)")
    print(board.read_text())
    return board


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Aggregate runs of several seeds into a mean +- std leaderboard.")
    p.add_argument("--runs", nargs="+", required=True, type=Path, help="run folders holding results-test.json")
    p.add_argument("--out", required=True, type=Path, help="folder for leaderboard-test.md and results-seeds.json")
    p.add_argument("--name", default=None, help="row name (default: the --out folder's name)")
    p.add_argument("--split", default="test")
    a = p.parse_args(argv)
    try:
        board = aggregate(a.runs, a.out, a.name, a.split)
    except (FileNotFoundError, ValueError, KeyError) as err:
        sys.exit(f"error: {err}")
    print(board.read_text())


if __name__ == "__main__":
    main()

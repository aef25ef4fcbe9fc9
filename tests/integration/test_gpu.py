"""GPU-only paths: bf16 autocast ranking, NCCL with one process, the faiss-gpu index.

Skipped without a CUDA GPU; ``bash bench/gpu_check.sh`` runs them (and bench.bench_eval at WikiMEL size)
on a GPU machine.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.support.helpers import ROOT, free_port

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bash bench/gpu_check.sh)")


def test_evaluation_under_nccl_with_one_process_matches_a_plain_run(tiny_export, tmp_path):
    """torchrun with one process on a GPU joins an NCCL group (model.distributed picks NCCL with CUDA);
    the result must equal the evaluation without any process group, both in fp32."""
    common = ["--checkpoint", str(tiny_export), "--split", "test", "--set", "eval.bf16=false", "--set",
              "eval.save_kb_cache=false"]
    runs = {"plain": [sys.executable, "-m", "eval.evaluate", "--out", str(tmp_path / "plain")],
            "nccl": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}",
                     "-m", "eval.evaluate", "--out", str(tmp_path / "nccl")]}
    env = dict(os.environ, TORCH_DISTRIBUTED_DEBUG="DETAIL")
    for name, cmd in runs.items():
        proc = subprocess.run(cmd + common, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
    per = {n: [json.loads(line) for line in open(tmp_path / n / "per_mention-test.jsonl")] for n in runs}
    assert [(r["index"], r["rank"]) for r in per["plain"]] == [(r["index"], r["rank"]) for r in per["nccl"]]
    nccl_run = json.loads((tmp_path / "nccl" / "results-test.json").read_text())
    assert nccl_run["world_size"] == 1


def test_nccl_collectives_with_one_process(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from model import distributed as D\n"
        "D.init_process_group(); assert dist.get_backend() == 'nccl', dist.get_backend()\n"
        "t = torch.arange(6, device=D.device_for_rank()).view(3, 2)\n"
        "assert torch.equal(D.gather_rows(t), t)\n"
        "dist.all_reduce(t); assert int(t.sum()) == 15\n"
        "dist.destroy_process_group(); print('ok')\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}", str(script)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]

"""Conversion in parts (``--num-jobs N --job-index I``, then ``--merge``): the merged output is the
one-job conversion byte for byte, each job decodes only its share of the images, and the merge
refuses parts that are missing, made otherwise or changed, leaving --out as it was."""

from __future__ import annotations

import subprocess
import sys

import pytest

import data_shards.convert as convert_mod
from tests.support.convert_jobs import _assert_same_conversion
from tests.support.helpers import ROOT as REPO


def test_cli_jobs_at_once_then_merge(raw, one_job, tmp_path, capsys):
    out = tmp_path / "out"
    base = [sys.executable, "-m", "data_shards.convert", "--dataset", "synthetic", "--root", str(raw), "--out", str(out),
            "--image-size", "32", "--shard-size", "29", "--workers", "1", "--num-jobs", "2"]
    # Part of the merge's checks from the CLI: no part yet, and --merge without --num-jobs.
    with pytest.raises(SystemExit, match=r"(?s)error: cannot merge .*no part for job indices \[0, 1\] of --num-jobs 2"):
        convert_mod.main(base[3:] + ["--merge"])
    with pytest.raises(SystemExit):
        convert_mod.main(base[3:-2] + ["--merge"])
    assert "--num-jobs N goes with --job-index I" in capsys.readouterr().err
    jobs = [subprocess.Popen(base + ["--job-index", str(i)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for i in (0, 1)]  # running at the same time
    for job in jobs:
        stdout, stderr = job.communicate(timeout=300)
        assert job.returncode == 0, stderr
        assert "wrote part" in stdout and "--merge instead of --job-index" in stdout
    merge = subprocess.run(base + ["--merge"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert merge.returncode == 0, merge.stderr
    assert "(merged from 2 parts)" in merge.stdout
    _assert_same_conversion(out, one_job)

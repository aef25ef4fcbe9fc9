"""Commands end with one line that names the file and says what to do, never a traceback: damaged
shards and exports, training checkpoints passed as exports, odd --image paths, arguments that are not
UTF-8, and a disk that fills (a real, small tmpfs)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_shards.convert import main as convert_main
from data_shards.folder import ShardFolder
from eval.evaluate import main as evaluate_main
from eval.link import main as link_main
from model.export import EXPORT_CONFIG, EXPORT_WEIGHTS
from tests.support.entry_errors import MENTION, SENTENCE, exit_line
from tests.support.helpers import ROOT


def command(module: str, *args: str | bytes) -> subprocess.CompletedProcess:
    """``python -m module args`` from the repository root; bytes arguments reach it as they are."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The failed command's stderr, which must be one line starting with 'error:'."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    return lines[0]


@pytest.fixture
def miscounted_shards(tiny_shards, tmp_path) -> tuple[Path, str]:
    """A copy of the shards whose manifest lists one sample fewer in the first test shard (sizes and
    digests unchanged, so the checksum check passes and the stream finds the difference)."""
    out = tmp_path / "shards"
    shutil.copytree(tiny_shards, out)
    manifest = json.loads((out / "manifest.json").read_text())
    first = manifest["shards"]["test"][0]
    first["samples"] -= 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out, first["name"]


def test_evaluate_names_a_shard_with_another_sample_count_in_one_line(miscounted_shards, tiny_export, tmp_path):
    shards, name = miscounted_shards
    args = ["--checkpoint", str(tiny_export), "--out", str(tmp_path / "res"), "--set", f"data.shards={shards}",
            "--set", "eval.save_kb_cache=false"]
    line = exit_line(evaluate_main, args)  # in this process: the stream read in the main process
    assert line == (f"error: {shards / name} holds more than the 28 samples the manifest lists: it was replaced; "
                    "convert the dataset again")
    # as a command, read by a DataLoader worker: the worker's traceback is not repeated
    assert one_error_line(command("eval.evaluate", *args, "--set", "eval.num_workers=1")) == line
    assert not (tmp_path / "res" / "results-test.json").exists()


@pytest.mark.parametrize("garbage, problem", [
    ("model: [unclosed\n  : x: {", r"is not valid YAML: expected ',' or '\]', but got ':' at line 2, column 3"),
    (b"\xff\xfe\x00garbage", r"is not UTF-8 text \(byte 0xff at offset 0\)"),
    ("- a list\n", r"the top level must be a mapping"),
])
def test_a_garbled_export_config_is_named_in_one_line(export_copy, garbage, problem):
    config = export_copy / EXPORT_CONFIG
    config.write_bytes(garbage if isinstance(garbage, bytes) else garbage.encode())
    for main, extra in ((evaluate_main, []), (link_main, ["--sentence", SENTENCE, "--mention", MENTION])):
        line = exit_line(main, ["--checkpoint", str(export_copy), *extra])
        assert re.match(rf"error: {config}:? {problem}.*restore it, or export the run again", line), line


@pytest.mark.parametrize("keep, first", [(0, "model, loss, data"), (None, "model.matcher.moe.top_k")],
                         ids=["empty", "cut before top_k"])
def test_a_truncated_export_config_names_the_file_and_the_first_missing_keys(export_copy, keep, first):
    config = export_copy / EXPORT_CONFIG
    lines = config.read_text().splitlines(keepends=True)
    if keep is None:  # cut just before the MoE's top_k: still valid YAML, whose defaults would change the ranking
        keep = next(i for i, line in enumerate(lines) if line.strip().startswith("top_k:"))
    config.write_text("".join(lines[:keep]))
    for main, extra in ((evaluate_main, []), (link_main, ["--sentence", SENTENCE, "--mention", MENTION])):
        line = exit_line(main, ["--checkpoint", str(export_copy), *extra])
        assert line.startswith(f"error: {config} is not the config exported with {EXPORT_WEIGHTS} (its sha256 differs "
                               f"from the one the weights record: cut or edited); it lacks {first}"), line
        assert line.endswith("the export config is damaged or from another version: restore it, or export the run again "
                             "(python -m train.checkpointing export runs/NAME/checkpoints/step-N OUT)"), line


def test_link_refuses_arguments_that_are_not_utf8_in_one_line(tiny_export):
    base = ["--checkpoint", str(tiny_export), "--device", "cpu"]
    proc = command("eval.link", *base, "--sentence", b"caf\xe9 at the harbour", "--mention", MENTION)  # Latin-1
    assert one_error_line(proc) == "error: --sentence is not valid UTF-8 text (byte 0xe9 at character 3): pass it in UTF-8"
    line = exit_line(link_main, [*base, "--sentence", SENTENCE, "--mention", MENTION, "--desc", "ok \udcff"])
    assert line == "error: --desc is not valid UTF-8 text (byte 0xff at character 3): pass it in UTF-8"


def _disk_kib(folder: Path) -> int:
    """What ``folder``'s files take on a tmpfs (4 KiB pages)."""
    return sum(-(-p.stat().st_size // 4096) * 4 for p in folder.rglob("*") if p.is_file())


def _convert_args(tiny_shards: Path, out: Path) -> list[str]:
    return ["--root", str(tiny_shards.parent / "raw"), "--out", str(out), "--image-size", "32", "--shard-size", "29"]


def test_a_conversion_that_fills_the_disk_says_so_and_leaves_no_manifest(tiny_shards, small_disk):
    disk = small_disk(_disk_kib(tiny_shards) // 2)
    out = disk / "shards"
    line = one_error_line(command("data_shards.convert", *_convert_args(tiny_shards, out), "--workers", "2"))
    assert line == (f"error: the disk holding {disk} is full (no space left on device) while converting into {out}: {out} "
                    "was left as it was (no new manifest); free space or choose another --out, then run again")
    assert list(disk.iterdir()) == []  # no --out, no half-built folder beside it


def test_a_reconversion_that_fills_the_disk_keeps_the_complete_one(tiny_shards, small_disk):
    disk = small_disk(_disk_kib(tiny_shards) * 8 // 5)  # one conversion fits, a second beside it does not
    out = disk / "shards"
    convert_main(_convert_args(tiny_shards, out) + ["--workers", "1"])
    manifest = (out / "manifest.json").read_bytes()
    line = one_error_line(command("data_shards.convert", *_convert_args(tiny_shards, out), "--workers", "1"))
    assert f"the disk holding {disk} is full" in line
    assert (out / "manifest.json").read_bytes() == manifest and ShardFolder(out).problems(progress=False) == []
    assert [p.name for p in disk.iterdir()] == ["shards"]

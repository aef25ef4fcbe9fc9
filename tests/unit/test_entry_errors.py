"""Commands end with one line that names the file and says what to do, never a traceback: damaged
shards and exports, training checkpoints passed as exports, odd --image paths, arguments that are not
UTF-8, and a disk that fills (a real, small tmpfs)."""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from eval.evaluate import main as evaluate_main
from eval.link import main as link_main
from model.export import EXPORT_CONFIG, EXPORT_FILES, EXPORT_WEIGHTS, ExportError, load_export
from tests.support.entry_errors import MENTION, SENTENCE, exit_line


def test_a_truncated_weights_file_is_named_by_evaluate_and_link(export_copy):
    weights = export_copy / EXPORT_WEIGHTS
    os.truncate(weights, weights.stat().st_size // 2)
    expected = rf"error: {weights} is truncated or damaged \(.*\); restore it, or export the run again"
    line = exit_line(evaluate_main, ["--checkpoint", str(export_copy)])
    assert re.fullmatch(expected + r".*", line), line
    line = exit_line(link_main, ["--checkpoint", str(export_copy), "--sentence", SENTENCE, "--mention", MENTION])
    assert re.fullmatch(expected + r".*", line), line


def test_an_export_without_a_config_digest_needs_its_model_section_whole_only(export_copy):
    """Exports of earlier versions record no config digest: their config may lack keys added since (defaults of
    evaluation settings), never a model key."""
    weights = export_copy / EXPORT_WEIGHTS
    save_file(load_file(str(weights)), str(weights))  # the same tensors, no metadata: an earlier export
    config = export_copy / EXPORT_CONFIG
    data = yaml.safe_load(config.read_text())
    del data["eval"]["kb_sharding"], data["eval"]["nprobe"]
    config.write_text(yaml.safe_dump(data))
    load_export(export_copy)  # accepted: the evaluation keys take their defaults
    del data["model"]["matcher"]["moe"]["top_k"]
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(ExportError, match="lacks model.matcher.moe.top_k"):
        load_export(export_copy)


def test_a_pickle_posing_as_the_weights_is_refused_and_never_run(export_copy, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (export_copy / EXPORT_WEIGHTS).write_bytes(pickle.dumps({"w": Payload()}))
    line = exit_line(evaluate_main, ["--checkpoint", str(export_copy)])
    assert f"{export_copy / EXPORT_WEIGHTS} is truncated or damaged" in line
    assert not marker.exists()


def test_a_training_checkpoint_is_named_as_such_with_the_export_command(tmp_path, export_copy):
    step = tmp_path / "runs" / "r" / "checkpoints" / "step-0000004"
    step.mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "complete.json"):  # what train/checkpointing.py writes there
        (step / name).write_bytes(b"")
    line = exit_line(evaluate_main, ["--checkpoint", str(step)])
    assert f"{step} is a training checkpoint (DeepSpeed state), not a model export" in line
    assert f"`python -m train.checkpointing export {step} OUT`" in line and "pass OUT" in line
    assert "pass a model export (runs/NAME/best) or a checkpoint folder" not in line
    run = tmp_path / "runs" / "r"  # the run folder itself: its best export is named
    shutil.copytree(export_copy, run / "best")
    assert exit_line(evaluate_main, ["--checkpoint", str(run)]).endswith(f"it is not a model export; pass {run / 'best'}")
    assert exit_line(evaluate_main, ["--checkpoint", str(tmp_path / "nowhere")]) == (
        f"error: {tmp_path / 'nowhere'} does not exist: pass a model export (runs/NAME/best)")


def test_link_says_what_an_image_path_is_when_it_is_not_a_file(tiny_export, tmp_path):
    from eval.link import link

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    base = ["--checkpoint", str(tiny_export), "--sentence", SENTENCE, "--mention", MENTION, "--device", "cpu"]
    assert exit_line(link_main, [*base, "--image", str(tmp_path)]) == (
        f"error: query image {tmp_path} is a directory: pass an image file")
    assert exit_line(link_main, [*base, "--image", str(fifo)]) == (
        f"error: query image {fifo} is not a regular file (a FIFO, socket or device): pass an image file")
    assert exit_line(link_main, [*base, "--image", str(tmp_path / "nope.jpg")]).endswith("nope.jpg not found (leave --image "
                                                                                        "out to link without an image)")
    with pytest.raises(ValueError, match="is not a regular file"):
        link(tiny_export, SENTENCE, MENTION, image=fifo, device="cpu")


def test_evaluate_on_a_full_disk_names_the_output_folder(tiny_export, small_disk):
    out = small_disk(4) / "res"  # one page: the per-mention file does not fit
    line = exit_line(evaluate_main, ["--checkpoint", str(tiny_export), "--out", str(out), "--set", "eval.save_kb_cache=false"])
    assert line == (f"error: the disk is full (no space left on device writing {out}): free space there, or write "
                    "elsewhere (--out)")


def test_weights_of_another_shape_than_the_config_are_named_in_one_line(export_copy):
    config, weights = export_copy / EXPORT_CONFIG, export_copy / EXPORT_WEIGHTS
    data = yaml.safe_load(config.read_text())
    data["model"]["matcher"]["hidden"] += 8  # the config of another model than the weights
    config.write_text(yaml.safe_dump(data))
    line = exit_line(evaluate_main, ["--checkpoint", str(export_copy)])
    assert line.startswith(f"error: {config} is not the config exported with {EXPORT_WEIGHTS} (its sha256 differs")
    save_file(load_file(str(weights)), str(weights))  # an earlier export (no config digest): the shapes tell
    line = exit_line(evaluate_main, ["--checkpoint", str(export_copy)])
    assert line.startswith(f"error: {weights} does not fit {config} (") and "size mismatch" in line
    assert line.endswith("restore it, or export the run again (python -m train.checkpointing export "
                         "runs/NAME/checkpoints/step-N OUT)")


def _export_files(export: Path, to: Path) -> Path:
    """A copy of an export's own files only: earlier tests may have saved entity caches beside the shared one."""
    to.mkdir()
    for name in EXPORT_FILES:
        shutil.copy2(export / name, to / name)
    return to


def _export_size(export: Path) -> int:
    return sum((export / name).stat().st_size for name in EXPORT_FILES)


def test_an_export_that_fills_the_disk_keeps_the_previous_one(tiny_export, small_disk):
    from model.export import save_export

    best = _export_files(tiny_export, small_disk(_export_size(tiny_export) * 3 // 2 // 1024 + 16) / "best")  # room for
    # one export, not for a second beside it
    before = {p.name: p.read_bytes() for p in best.iterdir()}
    model, cfg = load_export(tiny_export)
    with pytest.raises(OSError) as info:
        save_export(model, cfg, best)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(best)
    assert {p.name: p.read_bytes() for p in best.iterdir()} == before
    assert [p.name for p in best.parent.iterdir()] == ["best"]  # no best.tmp/ left


@pytest.mark.parametrize("command_main", [evaluate_main, link_main], ids=["evaluate", "link"])
def test_a_kb_cache_that_fills_the_disk_is_skipped_with_a_warning(command_main, tiny_export, tmp_path, small_disk,
                                                                  capsys):
    best = _export_files(tiny_export, small_disk(_export_size(tiny_export) // 1024 + 64) / "best")  # the export fits,
    # its KB cache (about 300 KiB) does not
    args = {evaluate_main: ["--out", str(tmp_path / "res")], link_main: ["--sentence", SENTENCE, "--mention", MENTION]}
    command_main(["--checkpoint", str(best), *args[command_main]])
    err = capsys.readouterr().err
    assert re.search(rf"warning: could not save the KB cache to {re.escape(str(best))}/kb_cache-\w+\.pt \(the disk is "
                     r"full\); going on without it \(the KB is encoded again next time\)", err), err
    assert sorted(p.name for p in best.iterdir()) == sorted(EXPORT_FILES)  # no partial file


def test_an_export_replaces_only_an_empty_folder_or_an_export(tiny_export, tmp_path):
    from model.export import ExportTargetError, save_export

    model, cfg = load_export(tiny_export)
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "kb_entity.json").write_text("{}")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / EXPORT_CONFIG).write_text("mine: 1\n")  # an export's file name alone is not an export
    for folder, shown in ((data, "images/, kb_entity.json"), (tmp_path / "configs", EXPORT_CONFIG)):
        with pytest.raises(ExportTargetError) as info:
            save_export(model, cfg, folder)
        assert str(info.value) == (f"{folder} is not empty and is not a model export ({shown}): exporting would replace "
                                   "it; choose a new or empty folder for the export (nothing was written)")
    assert sorted(p.name for p in data.iterdir()) == ["images", "kb_entity.json"]
    assert (tmp_path / "configs" / EXPORT_CONFIG).read_text() == "mine: 1\n"
    best = _export_files(tiny_export, tmp_path / "best")  # an export, with what eval.evaluate writes next to it: replaced
    (best / "kb_cache-0123456789abcdef.pt").write_bytes(b"cache")
    (best / "kb_cache-0123456789abcdef.rows0-128.pt").write_bytes(b"slice")
    (best / "results-test.json").write_text("{}")
    save_export(model, cfg, best)
    assert sorted(p.name for p in best.iterdir()) == sorted(EXPORT_FILES)
    (tmp_path / "best.old").mkdir()  # a sibling the swap would use
    (tmp_path / "best.old" / "notes.txt").write_text("mine")
    with pytest.raises(ExportTargetError, match=f"^{tmp_path / 'best.old'} is not empty and is not a model export"):
        save_export(model, cfg, best)
    assert (tmp_path / "best.old" / "notes.txt").read_text() == "mine"

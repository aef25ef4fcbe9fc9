"""Dataset reader on hand-written fixtures, and the shard converter (manifest, images, errors)."""

import pytest

from tests.support.fixtures import write_fixture


def test_convert_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    from data_shards.convert import main

    write_fixture(tmp_path / "raw", "wikimel")
    (tmp_path / "raw" / "kb_image").rename(tmp_path / "raw" / "kb_images_renamed")
    with pytest.raises(SystemExit, match="KB .*100.0%"):
        main(["--dataset", "wikimel", "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "o"), "--image-size", "16"])

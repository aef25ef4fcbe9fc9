"""The single-query link command on the tiny synthetic benchmark: results, entity cache, images."""

import pytest

from eval.link import link, main
from tests.support.link import MENTION, SENTENCE


def test_cli_prints_the_table_and_a_missing_image_is_a_clear_error(own_export, tmp_path, capsys):
    main(["--checkpoint", str(own_export), "--sentence", SENTENCE, "--mention", MENTION, "--top-k", "3", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "entity cache built" in out and "QID" in out
    assert len([line for line in out.splitlines() if line.strip().startswith(("1 ", "2 ", "3 "))]) == 3

    missing = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match="query image .*nope.jpg not found"):
        link(own_export, SENTENCE, MENTION, image=missing, device="cpu")
    with pytest.raises(SystemExit, match="error: query image .*nope.jpg not found"):
        main(["--checkpoint", str(own_export), "--sentence", SENTENCE, "--mention", MENTION, "--image", str(missing)])

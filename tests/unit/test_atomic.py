"""core/atomic.py: a destination is replaced only by a complete file, and no temporary file stays behind."""

import os

import numpy as np
import pytest

from core.atomic import atomic_path, atomic_write, temp_name, write_text_atomic


def test_success_replaces_the_destination_and_leaves_no_temporary_file(tmp_path):
    dest = tmp_path / "out.json"
    dest.write_text("old")
    with atomic_write(dest) as fh:
        fh.write("new")
        assert dest.read_text() == "old"  # nothing visible before the block ends
    assert dest.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_an_exception_keeps_the_old_destination_and_removes_the_temporary_file(tmp_path):
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_write(dest, "wb") as fh:
        fh.write(b"partial")
        raise RuntimeError("boom")
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_an_exception_without_a_destination_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "new.pt") as tmp:
        tmp.write_bytes(b"x")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_the_temporary_file_is_a_hidden_sibling_named_by_pid(tmp_path):
    assert temp_name(tmp_path / "a.npy") == tmp_path / f".a.npy.tmp-{os.getpid()}"
    with atomic_path(tmp_path / "a.npy") as tmp:
        assert tmp == temp_name(tmp_path / "a.npy")
        tmp.write_bytes(b"x")
    assert (tmp_path / "a.npy").read_bytes() == b"x"


def test_writers_write_the_same_bytes_as_a_plain_write(tmp_path):
    rows = np.arange(12, dtype=np.int64).reshape(3, 4)
    np.save(tmp_path / "plain.npy", rows)
    with atomic_write(tmp_path / "atomic.npy", "wb") as fh:
        np.save(fh, rows)  # a file object: np.save adds no ".npy" to the temporary name
    assert (tmp_path / "atomic.npy").read_bytes() == (tmp_path / "plain.npy").read_bytes()
    write_text_atomic(tmp_path / "t.txt", "é\n", encoding="utf-8")
    assert (tmp_path / "t.txt").read_bytes() == "é\n".encode()


def test_only_new_file_modes(tmp_path):
    with pytest.raises(ValueError, match="mode"), atomic_write(tmp_path / "x", "a"):
        pass

"""core/hashing.py: the chunked file digest is the digest of the file's bytes."""

import hashlib

from core.hashing import file_sha256


def test_the_chunked_digest_is_the_digest_of_the_bytes(tmp_path):
    data = bytes(range(256)) * 1000 + b"tail"
    (tmp_path / "f").write_bytes(data)
    blocks: list[int] = []
    assert file_sha256(tmp_path / "f", chunk=4096, on_block=blocks.append) == hashlib.sha256(data).hexdigest()
    assert sum(blocks) == len(data) and max(blocks) == 4096
    (tmp_path / "empty").write_bytes(b"")
    assert file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()

"""Shared by tests/unit/test_data_faults.py and tests/integration/test_data_faults.py."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


@pytest.fixture
def shards_copy(tiny_shards, tmp_path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(tiny_shards, out)
    return out


def _manifest(shards: Path) -> dict:
    return json.loads((shards / "manifest.json").read_text())


def _cut_at_sample_boundary(path: Path, keep: int) -> None:
    """Rewrite a shard as a valid tar holding only its first ``keep`` samples."""
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    keys = list(dict.fromkeys(m.name.split(".")[0] for m, _ in members))[:keep]
    with tarfile.open(path, "w") as tf:
        for m, data in members:
            if m.name.split(".")[0] in keys:
                tf.addfile(m, io.BytesIO(data))


class _HostileLLM(ThreadingHTTPServer):
    """A chat-completions server whose replies follow ``behaviour(request_number)``: "ok" (reply "1"),
    "vague" (an unparsable reply), "trickle" (one byte every ``trickle_s``, ``trickle_bytes`` of them),
    "huge" (2 MB with Content-Length), "huge-unannounced" (2 MB, no length: read until close)."""

    daemon_threads = True

    def __init__(self, behaviour, trickle_s: float = 0.2, trickle_bytes: int = 40) -> None:
        super().__init__(("127.0.0.1", 0), _HostileHandler)
        self.behaviour, self.trickle_s, self.trickle_bytes = behaviour, trickle_s, trickle_bytes
        self.count, self.lock = 0, threading.Lock()
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _HostileHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            self.server.count += 1
            kind = self.server.behaviour(self.server.count)
        content = "I cannot tell" if kind == "vague" else "1"
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        try:
            self.send_response(200)
            if kind == "huge":
                body = b" " * (2 << 20) + body
                self.send_header("Content-Length", str(len(body)))
            elif kind == "huge-unannounced":
                body = b" " * (2 << 20) + body
            elif kind != "trickle":
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if kind == "trickle":
                for _ in range(self.server.trickle_bytes):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(self.server.trickle_s)
            self.wfile.write(body)
        except OSError:  # the client gave up
            pass

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hostile_llm():
    servers: list[_HostileLLM] = []

    def start(behaviour, **kw) -> _HostileLLM:
        servers.append(_HostileLLM(behaviour, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()

"""Shared by tests/unit/test_dme.py and tests/integration/test_dme.py."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


class _FakeLLM(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, replies: dict[str, str], delay: dict[str, float] | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.replies, self.delay, self.bodies = replies, delay or {}, []
        self.count_lock = threading.Lock()
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    @property
    def requests(self) -> int:
        return len(self.bodies)


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.count_lock:
            self.server.bodies.append(body)
        if self.path != "/v1/chat/completions":
            self.send_error(404)
            return
        user = body["messages"][-1]["content"]
        mention = next(line for line in user.splitlines() if line.startswith("Mention: "))[len("Mention: "):]
        time.sleep(self.server.delay.get(mention, 0.0))
        data = json.dumps({"object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": self.server.replies[mention]}, "finish_reason": "stop"}]})
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data.encode())
        except OSError:  # the client gave up (timeout test)
            pass

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_llm():
    servers = []

    def start(replies, delay=None):
        servers.append(_FakeLLM(replies, delay))
        return servers[-1]

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def _load(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))

"""A real HTTP server on loopback standing in for webhook receivers: records each call."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


class Receiver(BaseHTTPRequestHandler):
    calls: list[dict[str, Any]] = []
    flaky_left = 0

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        body = json.loads(raw)
        type(self).calls.append(
            {"path": self.path, "body": body, "key": self.headers.get("Idempotency-Key"),
             "raw": raw, "signature": self.headers.get("Journeys-Signature")}
        )  # fmt: skip
        if self.path == "/flaky" and type(self).flaky_left > 0:
            type(self).flaky_left -= 1
            self._reply(503, {"error": "busy"})
        elif self.path == "/reject":
            self._reply(422, {"error": "bad customer"})
        else:
            self._reply(200, {"segment": "gold", "echo": body})

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        """Quiet: the test asserts on `calls`, not on the access log."""


@pytest.fixture
def receiver() -> Iterator[str]:
    Receiver.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()

"""Local stand-ins for the message providers, for `make dev`, the tests and the benchmark.

- An HTTP server speaking the SMS (Twilio-style), push (FCM-style) and webhook APIs the channels
  call. Like those APIs it deduplicates on `Idempotency-Key`: a repeated key gets the first
  answer and delivers nothing new; `deliveries` is what customers would have received. Knobs
  for tests: `fail_next` (503s), `busy_next` (429 with Retry-After), `hang_next` (accept and
  deliver, then hold the answer for `hang_seconds`).
- An SMTP server (aiosmtpd) that accepts everything.
With a `record_dir`, each delivery is also written there (`sms.jsonl`, `push.jsonl`,
`webhook.jsonl`, `mail/<n>.eml`) so a developer can read what was sent.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from activities.signing import SIGNATURE_HEADER, verify_signature

SID, TOKEN = "AC-test", "sms-token"
PUSH_TOKEN = "push-token"
WEBHOOK_SECRET = "hook-secret"
INVALID_NUMBER = "+15005550001"  # Twilio's magic "invalid number": 400, code 21211
UNREGISTERED = "unregistered-device"  # FCM: 404 UNREGISTERED
SENDER_MISMATCH = "other-senders-device"  # FCM: 403 SENDER_ID_MISMATCH (about the token)
FORBIDDEN_PROJECT = "forbidden-device"  # FCM: 403 PERMISSION_DENIED (about our project)


def fcm_error(status: int, grpc_status: str, error_code: str | None, message: str) -> dict:
    """An FCM HTTP v1 error body (`error.details[].errorCode` names the FCM error)."""
    details = []
    if error_code:
        details.append(
            {
                "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                "errorCode": error_code,
            }
        )
    return {
        "error": {"code": status, "message": message, "status": grpc_status, "details": details}
    }


@dataclass
class Provider:
    url: str = ""
    record_dir: Path | None = None
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0
    # Every request per Idempotency-Key, the repeats this provider deduplicated included: what
    # a provider that ignores the key would have delivered (bench/chaos.py counts them).
    requests_by_key: dict[str, int] = field(default_factory=dict)
    fail_next: int = 0
    busy_next: int = 0
    hang_next: int = 0
    hang_seconds: float = 3.0
    answers: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def by_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.deliveries if d["kind"] == kind]

    def record(self, delivery: dict[str, Any]) -> None:
        if self.record_dir is not None:
            self.record_dir.mkdir(parents=True, exist_ok=True)
            with (self.record_dir / f"{delivery['kind']}.jsonl").open("a") as f:
                f.write(json.dumps(delivery) + "\n")


def _handler(p: Provider) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            key = self.headers.get("Idempotency-Key") or ""
            with p.lock:
                p.requests += 1
                if key:
                    p.requests_by_key[key] = p.requests_by_key.get(key, 0) + 1
                if p.fail_next > 0:
                    p.fail_next -= 1
                    return self._reply(503, {"message": "provider unavailable"})
                if p.busy_next > 0:
                    p.busy_next -= 1
                    return self._reply(429, {"message": "slow down"}, {"Retry-After": "1"})
                if key and key in p.answers:  # a repeat: the first answer, nothing delivered
                    return self._reply(*p.answers[key])
                status, body, delivery = self._handle(raw)
                if delivery is not None:
                    p.deliveries.append({**delivery, "key": key})
                    p.record({**delivery, "key": key})
                if key and status < 500:
                    p.answers[key] = (status, body)
                hang = p.hang_next > 0 and delivery is not None
                if hang:
                    p.hang_next -= 1
            if hang:
                time.sleep(p.hang_seconds)
            self._reply(status, body)

        def _handle(self, raw: bytes) -> tuple[int, dict[str, Any], dict[str, Any] | None]:
            path = self.path
            n = len(p.deliveries) + 1
            if path == f"/2010-04-01/Accounts/{SID}/Messages.json":
                auth = self.headers.get("Authorization", "")
                if auth != "Basic " + base64.b64encode(f"{SID}:{TOKEN}".encode()).decode():
                    return 401, {"code": 20003, "message": "Authenticate"}, None
                form = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
                if form.get("To") == INVALID_NUMBER:
                    return 400, {"code": 21211, "message": "Invalid 'To' Phone Number"}, None
                sid = f"SM{n:032d}"
                return 201, {"sid": sid, "status": "queued"}, {"kind": "sms", "sid": sid, **form}
            if path.startswith("/v1/projects/") and path.endswith("/messages:send"):
                if self.headers.get("Authorization") != f"Bearer {PUSH_TOKEN}":
                    return 401, {"error": "UNAUTHENTICATED"}, None
                msg = json.loads(raw)["message"]
                if msg.get("token") == UNREGISTERED:
                    return 404, {"error": "UNREGISTERED", "message": "token not registered"}, None
                if msg.get("token") == SENDER_MISMATCH:
                    body = fcm_error(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH", "mismatch")
                    return 403, body, None
                if msg.get("token") == FORBIDDEN_PROJECT:
                    body = fcm_error(403, "PERMISSION_DENIED", None, "permission denied")
                    return 403, body, None
                name = f"{path.removesuffix(':send')}/{n}"
                return 200, {"name": name}, {"kind": "push", "name": name, **msg}
            if path.startswith("/hooks/reject"):  # a receiver that will never take it
                return 422, {"error": "unprocessable message"}, None
            if path.startswith("/hooks"):
                try:
                    verify_signature(WEBHOOK_SECRET, self.headers.get(SIGNATURE_HEADER), raw)
                except ValueError as err:
                    return 401, {"error": str(err)}, None
                return 200, {"ok": True}, {"kind": "webhook", "body": json.loads(raw)}
            return 404, {"error": f"no route {path}"}, None

        def _reply(
            self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
        ) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            """Quiet: tests assert on `deliveries`."""

    return Handler


def serve(port: int = 0, record_dir: Path | None = None) -> tuple[Provider, ThreadingHTTPServer]:
    """Start the HTTP provider on 127.0.0.1:`port` (0: any free port) in a thread."""
    p = Provider(record_dir=record_dir)
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(p))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    p.url = f"http://127.0.0.1:{server.server_address[1]}"
    return p, server


def provider_settings(p: Provider) -> dict[str, Any]:
    """Settings fields that point every HTTP channel at this provider."""
    return {
        "sms_api_url": f"{p.url}/2010-04-01",
        "sms_account_sid": SID,
        "sms_auth_token": TOKEN,
        "push_api_url": p.url,
        "push_access_token": PUSH_TOKEN,
        "webhook_channel_url": f"{p.url}/hooks/messages",
        "webhook_signing_secret": WEBHOOK_SECRET,
    }


@dataclass
class MailSink:
    """aiosmtpd handler: accepts every message; keeps the envelopes, and writes `.eml` files
    when given a folder."""

    envelopes: list[Any] = field(default_factory=list)
    record_dir: Path | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        if self.record_dir is not None:
            self.record_dir.mkdir(parents=True, exist_ok=True)
            n = len(list(self.record_dir.glob("*.eml"))) + 1
            (self.record_dir / f"{n:06d}.eml").write_bytes(envelope.content)
        return "250 Message accepted for delivery"


def serve_smtp(handler: Any, port: int = 0) -> Any:
    """An aiosmtpd server on 127.0.0.1:`port` (0: a free one) in its thread; `.stop()` it."""
    import logging
    import socket

    from aiosmtpd.controller import Controller

    # aiosmtpd logs every connection at INFO (and its own start-up probe): the dev log shows
    # what was sent through the .eml files instead.
    logging.getLogger("mail.log").setLevel(logging.WARNING)

    if port == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    return controller

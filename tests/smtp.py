"""A real SMTP server (aiosmtpd) on loopback for tests: records what it accepted, and refuses
a few addresses the way real servers do. Fixture: `smtp` → (recorder, port)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

import pytest
from aiosmtpd.controller import Controller

REFUSED = "gone@example.com"  # 550 at RCPT
BUSY = "busy@example.com"  # 450 at RCPT
TOO_BIG = "big@example.com"  # 552 at DATA


@dataclass
class Recorder:
    """Accepts every recipient but the ones above and those given an answer in `rcpt_replies`
    (address → the whole reply line, e.g. "550 5.1.1 user unknown"), and records each
    delivered envelope."""

    envelopes: list[Any] = field(default_factory=list)
    peers: list[Any] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        if address == REFUSED:
            return "550 mailbox unavailable"
        if address == BUSY:
            return "450 mailbox busy, try later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if TOO_BIG in envelope.rcpt_tos:
            return "552 message size exceeds limit"
        self.envelopes.append(envelope)
        self.peers.append(session.peer)  # (ip, port): one per client connection
        return "250 Message accepted for delivery"

    def messages(self) -> list[EmailMessage]:
        return [message_from_bytes(e.content, policy=policy.default) for e in self.envelopes]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def smtp() -> Iterator[tuple[Recorder, int]]:
    recorder = Recorder()
    port = free_port()
    controller = Controller(recorder, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield recorder, port
    finally:
        controller.stop()

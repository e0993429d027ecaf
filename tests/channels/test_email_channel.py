"""EmailChannel against a real SMTP server (aiosmtpd) on loopback."""

from __future__ import annotations

import hashlib
from typing import Any

import aiosmtplib
import pytest

from activities.channels import RenderedMessage
from activities.channels.email import EmailChannel, PermanentDeliveryError
from tests.smtp import BUSY, REFUSED, TOO_BIG, Recorder, free_port


def channel(port: int) -> EmailChannel:
    return EmailChannel(
        host="127.0.0.1",
        port=port,
        sender="Journeys <news@mail.example.com>",
        sender_domain="mail.example.com",
        timeout=5,
    )


def rendered(key: str = "enr-1:3", **kw: Any) -> RenderedMessage:
    values: dict[str, Any] = {
        "customer_id": "ann",
        "channel": "email",
        "subject": "Your cart misses you",
        "body": "Hi Ann, the Blue Mug is still waiting.",
        "to": "ann@example.com",
        "html": "<p>Hi Ann, the <b>Blue Mug</b> is still waiting.</p>",
        "unsubscribe_url": "https://journeys.example.com/u/abc123",
    }
    values.update(kw)
    return RenderedMessage(idempotency_key=key, **values)


def expected_message_id(key: str) -> str:
    return f"<{hashlib.sha256(key.encode()).hexdigest()[:32]}@mail.example.com>"


async def test_delivers_headers_and_parts(smtp: tuple[Recorder, int]) -> None:
    recorder, port = smtp
    delivery = await channel(port).deliver(rendered())

    assert delivery.status == "sent"
    assert delivery.provider_id == expected_message_id("enr-1:3")
    [envelope] = recorder.envelopes
    assert envelope.mail_from == "news@mail.example.com"
    assert envelope.rcpt_tos == ["ann@example.com"]
    [msg] = recorder.messages()
    assert msg["From"] == "Journeys <news@mail.example.com>"
    assert msg["To"] == "ann@example.com"
    assert msg["Subject"] == "Your cart misses you"
    assert msg["Message-ID"] == expected_message_id("enr-1:3")
    assert msg["X-Journeys-Idempotency-Key"] == "enr-1:3"
    assert msg["List-Unsubscribe"] == "<https://journeys.example.com/u/abc123>"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg.get_content_type() == "multipart/alternative"
    plain = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert plain is not None and html is not None
    assert plain.get_content().strip() == "Hi Ann, the Blue Mug is still waiting."
    assert html.get_content().strip() == "<p>Hi Ann, the <b>Blue Mug</b> is still waiting.</p>"


async def test_plain_only_without_html_or_unsubscribe(smtp: tuple[Recorder, int]) -> None:
    recorder, port = smtp
    await channel(port).deliver(rendered(html=None, unsubscribe_url=None))

    [msg] = recorder.messages()
    assert msg.get_content_type() == "text/plain"
    assert msg["List-Unsubscribe"] is None
    assert msg["List-Unsubscribe-Post"] is None


async def test_message_id_follows_the_idempotency_key(smtp: tuple[Recorder, int]) -> None:
    recorder, port = smtp
    ch = channel(port)
    first = await ch.deliver(rendered("enr-1:3"))
    resend = await ch.deliver(rendered("enr-1:3"))
    other = await ch.deliver(rendered("enr-1:4"))

    ids = [m["Message-ID"] for m in recorder.messages()]
    assert ids[0] == ids[1] == first.provider_id == resend.provider_id
    assert ids[2] == other.provider_id != ids[0]


async def test_a_message_email_cannot_carry_fails_for_good(smtp: tuple[Recorder, int]) -> None:
    """Never retried forever, and nobody's address is suppressed for it."""
    recorder, port = smtp
    for to in (None, "", "a@example.com\r\nBcc: all@example.com"):
        with pytest.raises(PermanentDeliveryError, match="invalid message") as info:
            await channel(port).deliver(rendered(to=to))
        assert not info.value.suppress
    assert recorder.envelopes == []


async def test_line_breaks_in_a_subject_become_spaces(smtp: tuple[Recorder, int]) -> None:
    recorder, port = smtp
    await channel(port).deliver(rendered(subject="Hi\r\nBcc: all@example.com"))
    (mail,) = recorder.messages()
    assert mail["Subject"] == "Hi Bcc: all@example.com" and mail["Bcc"] is None


async def test_550_is_a_permanent_delivery_error(smtp: tuple[Recorder, int]) -> None:
    recorder, port = smtp
    with pytest.raises(PermanentDeliveryError) as info:
        await channel(port).deliver(rendered(to=REFUSED))

    assert info.value.code == 550
    assert "mailbox unavailable" in info.value.message
    assert info.value.recipient == REFUSED
    assert isinstance(info.value.__cause__, aiosmtplib.SMTPRecipientsRefused)
    assert recorder.envelopes == []


async def test_552_at_data_is_a_permanent_delivery_error(smtp: tuple[Recorder, int]) -> None:
    _, port = smtp
    with pytest.raises(PermanentDeliveryError) as info:
        await channel(port).deliver(rendered(to=TOO_BIG))

    assert info.value.code == 552
    assert isinstance(info.value.__cause__, aiosmtplib.SMTPDataError)


async def test_4xx_refusal_raises_a_retryable_error(smtp: tuple[Recorder, int]) -> None:
    recorder, port = smtp
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as info:
        await channel(port).deliver(rendered(to=BUSY))

    assert not isinstance(info.value, PermanentDeliveryError)
    assert info.value.recipients[0].code == 450
    assert recorder.envelopes == []


async def test_server_down_raises_a_retryable_error() -> None:
    port = free_port()  # bound then released: nothing listens there
    with pytest.raises(OSError) as info:
        await channel(port).deliver(rendered())

    assert isinstance(info.value, aiosmtplib.SMTPConnectError)
    assert not isinstance(info.value, PermanentDeliveryError)


async def test_connections_are_reused_until_idle_or_broken(smtp):
    recorder, port = smtp
    mail = channel(port)
    for i in range(3):
        await mail.deliver(rendered(f"k{i}"))
    assert len(recorder.envelopes) == 3
    assert len(set(recorder.peers)) == 1  # one connection for all three

    with pytest.raises(PermanentDeliveryError):
        await mail.deliver(rendered("k-refused", to=REFUSED))
    await mail.deliver(rendered("k3"))  # the refused one's connection was not reused
    assert len(set(recorder.peers)) == 2

    mail.idle_seconds = 0  # everything idle is too old now
    await mail.deliver(rendered("k4"))
    assert len(set(recorder.peers)) == 3
    await mail.aclose()
    assert mail._idle == []


async def test_a_connection_the_server_dropped_is_replaced_once(smtp):
    recorder, port = smtp
    mail = channel(port)
    await mail.deliver(rendered("a"))
    (idle, _) = mail._idle[0]
    idle.close()  # as if the server hung up while it sat idle
    mail._idle[0] = (_Dropped(idle), mail._idle[0][1])
    await mail.deliver(rendered("b"))
    assert [e.rcpt_tos for e in recorder.envelopes] == [["ann@example.com"]] * 2
    assert len(set(recorder.peers)) == 2


class _Dropped:
    """A pooled client whose server went away: says connected, fails on use."""

    def __init__(self, smtp: aiosmtplib.SMTP) -> None:
        self.smtp = smtp
        self.is_connected = True

    async def sendmail(self, *args: Any) -> None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")

    def close(self) -> None:
        self.smtp.close()


async def test_a_server_restart_between_messages_costs_nothing():
    from aiosmtpd.controller import Controller

    recorder, port = Recorder(), free_port()
    server = Controller(recorder, hostname="127.0.0.1", port=port)
    server.start()
    mail = channel(port)
    try:
        await mail.deliver(rendered("before"))
        server.stop()  # drops the idle connection the channel keeps
        server = Controller(recorder, hostname="127.0.0.1", port=port)
        server.start()
        await mail.deliver(rendered("after"))
    finally:
        server.stop()
    assert len(recorder.envelopes) == 2 and len(set(recorder.peers)) == 2


async def test_unsendable_addresses_fail_for_good_and_refusals_are_not_in_doubt(smtp):
    from activities.channels import definitely_not_sent

    recorder, port = smtp
    for to in ("jö@example.com", "a b@example.com"):
        with pytest.raises(PermanentDeliveryError, match="cannot be sent") as info:
            await channel(port).deliver(rendered(to=to))
        assert not info.value.suppress
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as busy:  # 450 at RCPT
        await channel(port).deliver(rendered(to=BUSY))
    assert definitely_not_sent(busy.value)  # back to pending: consent is checked again
    assert recorder.envelopes == []

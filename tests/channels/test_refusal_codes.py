"""Which refusals suppress the address: SMTP by the RCPT reply's enhanced status code
(RFC 3463), FCM by its error code. Against the real local servers (aiosmtpd, the HTTP
provider stand-in)."""

from __future__ import annotations

import aiosmtplib
import httpx
import pytest

from activities.channels import (
    PermanentDeliveryError,
    ProviderUnavailable,
    RenderedMessage,
    definitely_not_sent,
)
from activities.channels.email import EmailChannel
from activities.channels.http import PushChannel
from activities.channels.sandbox import FORBIDDEN_PROJECT, SENDER_MISMATCH
from tests.providers import PUSH_TOKEN, UNREGISTERED, Provider
from tests.smtp import Recorder


def _mail(port: int) -> EmailChannel:
    return EmailChannel(
        host="127.0.0.1", port=port, sender="news@mail.example.com",
        sender_domain="mail.example.com", timeout=5,
    )  # fmt: skip


def _msg(to: str, channel: str = "email") -> RenderedMessage:
    return RenderedMessage(
        idempotency_key=f"k-{to}", customer_id="c", channel=channel, subject="s", body="b", to=to
    )


# The address is bad: a hard bounce, the address is suppressed.
SUPPRESS = [
    "550 5.1.1 The email account that you tried to reach does not exist",
    "550 5.1.2 Host unknown",
    "553 5.1.3 Bad recipient address syntax",
    "550 5.1.10 Recipient address rejected: null MX",
    "550 5.2.1 The email account that you tried to reach is disabled",
    "550 mailbox unavailable",  # no enhanced code: the RFC 5321 text of a missing mailbox
    "550 No such user here",
    "553 sorry, user unknown",
    "550 5.1.0 <x@example.com>: Recipient address rejected: User unknown",
]
# About our setup (relay, authentication, sender, policy): retried, never suppressed.
OURS = [
    "550 5.7.1 Relaying denied",
    "530 5.7.0 Authentication required",
    "554 5.7.1 Client host rejected: access denied",
    "550 5.7.26 Unauthenticated email is not accepted from this domain",
    "553 5.1.7 The sender address is invalid",
    "550 5.1.8 Bad sender's system address",
    # Postfix checks the sender at RCPT time: a bad EMAIL_FROM must not suppress customers.
    "550 5.1.0 <noreply@mail.example.com>: Sender address rejected: User unknown in local table",
    "553 5.1.3 <noreply@mail.example.com>: Sender address rejected: not a valid address",
]
# Refused for good but not about the address: this message fails, no suppression.
MESSAGE_ONLY = [
    "552 5.2.2 Mailbox full",
    "554 5.4.4 Unable to route",
    "550 5.6.0 Content rejected",
    "550 relay not permitted",  # no enhanced code, not clearly the mailbox: conservative
    "554 rejected by policy",
    "550 access denied",
    "550 5.1.0 Address rejected",  # "other address status" that does not say the mailbox is gone
]


@pytest.mark.parametrize("reply", SUPPRESS)
async def test_refusals_about_the_address_suppress_it(smtp: tuple[Recorder, int], reply) -> None:
    recorder, port = smtp
    recorder.rcpt_replies["x@example.com"] = reply
    with pytest.raises(PermanentDeliveryError) as info:
        await _mail(port).deliver(_msg("x@example.com"))
    assert info.value.suppress
    assert info.value.code == int(reply[:3])
    assert info.value.recipient == "x@example.com"
    assert recorder.envelopes == []


@pytest.mark.parametrize("reply", OURS)
async def test_refusals_about_our_setup_retry_and_never_suppress(smtp, reply) -> None:
    recorder, port = smtp
    recorder.rcpt_replies["x@example.com"] = reply
    with pytest.raises(ProviderUnavailable) as info:
        await _mail(port).deliver(_msg("x@example.com"))
    assert not isinstance(info.value, PermanentDeliveryError)
    assert definitely_not_sent(info.value)  # refused at RCPT: the server did not take it
    assert reply[4:] in str(info.value)
    assert recorder.envelopes == []


@pytest.mark.parametrize("reply", MESSAGE_ONLY)
async def test_other_permanent_refusals_fail_only_this_message(smtp, reply) -> None:
    recorder, port = smtp
    recorder.rcpt_replies["x@example.com"] = reply
    with pytest.raises(PermanentDeliveryError) as info:
        await _mail(port).deliver(_msg("x@example.com"))
    assert not info.value.suppress
    assert info.value.code == int(reply[:3])


async def test_4xx_with_an_enhanced_code_is_still_retried(smtp) -> None:
    recorder, port = smtp
    recorder.rcpt_replies["x@example.com"] = "450 4.2.1 Try again later"
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await _mail(port).deliver(_msg("x@example.com"))


@pytest.fixture
async def http():
    async with httpx.AsyncClient(timeout=5) as client:
        yield client


async def test_fcm_refusals_about_the_token_suppress_it(http, provider: Provider) -> None:
    push = PushChannel(http, base_url=provider.url, project_id="shop", access_token=PUSH_TOKEN)
    for token, status in ((UNREGISTERED, 404), (SENDER_MISMATCH, 403)):
        with pytest.raises(PermanentDeliveryError) as info:
            await push.deliver(_msg(token, "push"))
        assert (info.value.code, info.value.suppress, info.value.recipient) == (
            status,
            True,
            token,
        )
    # Any other 403 is about our project or credentials: retried, the token is kept.
    with pytest.raises(ProviderUnavailable, match="403"):
        await push.deliver(_msg(FORBIDDEN_PROJECT, "push"))
    assert provider.deliveries == []

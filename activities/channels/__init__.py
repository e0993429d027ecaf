"""One small channel protocol; every provider implements it the same way.

A channel gets a rendered message that carries its idempotency key (providers deduplicate on
it, SMTP carries it as Message-ID) and answers with a Delivery. `outbox` stores the message in
`messages` as the delivery itself (a downstream system reads it from there or from the API).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class RenderedMessage:
    idempotency_key: str
    customer_id: str
    channel: str
    subject: str | None
    body: str
    to: str | None = None  # the address on this channel (email, phone, device token)
    html: str | None = None
    unsubscribe_url: str | None = None


@dataclass(frozen=True)
class Delivery:
    status: str  # sent | failed
    provider_id: str | None = None


class Channel(Protocol):
    name: str

    async def deliver(self, message: RenderedMessage) -> Delivery:
        """Hand the message to the provider, carrying its idempotency key."""
        ...


class OutboxChannel:
    name = "outbox"

    async def deliver(self, message: RenderedMessage) -> Delivery:
        return Delivery(status="sent", provider_id=message.idempotency_key)


def build_channels(settings: Any) -> dict[str, Channel]:
    """The channels this deployment has: outbox always, email when SMTP is configured."""
    channels: dict[str, Channel] = {"outbox": OutboxChannel()}
    if settings.smtp_host:
        from activities.channels.email import EmailChannel

        channels["email"] = EmailChannel(
            host=settings.smtp_host,
            port=settings.smtp_port,
            sender=settings.email_from,
            sender_domain=settings.email_sender_domain,
            username=settings.smtp_username,
            password=settings.smtp_password,
            use_tls=settings.smtp_use_tls,
            start_tls=settings.smtp_start_tls,
            timeout=settings.smtp_timeout,
        )
    return channels

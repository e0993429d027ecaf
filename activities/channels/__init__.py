"""One small channel protocol; every provider implements it the same way.

A channel gets a rendered message that carries its idempotency key (providers deduplicate on
it, SMTP carries it as Message-ID) and answers with a Delivery. `outbox` stores the message in
`messages` as the delivery itself (a downstream system reads it from there or from the API).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


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


CHANNELS: dict[str, Channel] = {"outbox": OutboxChannel()}

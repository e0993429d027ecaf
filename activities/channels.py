"""One small channel protocol; every provider implements it the same way.

This issue ships `outbox`: the rendered message stored in `messages` is the delivery (a
downstream system, or a person, reads it from there / from the API).
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

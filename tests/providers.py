"""Fixture `provider`: the local SMS / push / webhook provider (activities.channels.sandbox), a
real HTTP server on loopback that deduplicates on Idempotency-Key like Twilio- and Stripe-style
APIs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from activities.channels.sandbox import (
    INVALID_NUMBER,
    PUSH_TOKEN,
    SID,
    TOKEN,
    UNREGISTERED,
    WEBHOOK_SECRET,
    Provider,
    provider_settings,
    serve,
)

__all__ = [
    "INVALID_NUMBER",
    "PUSH_TOKEN",
    "SID",
    "TOKEN",
    "UNREGISTERED",
    "WEBHOOK_SECRET",
    "Provider",
    "provider",
    "provider_settings",
    "serve",
]


@pytest.fixture
def provider() -> Iterator[Provider]:
    p, server = serve()
    yield p
    server.shutdown()
